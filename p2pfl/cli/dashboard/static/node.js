// The daemon's page: this node's /status, polled every second.
import { badge, bytes, cell, deltas, el, fill, known, lineChart, list, num, pct, poll, record, shortId, table, tile } from "./common.js";

const RECENT = 10; // rounds in the table

function render(status) {
  const history = list(status.history).filter((r) => r && typeof r === "object");
  const target = known(status.rounds_target) ? `/${status.rounds_target}` : "";
  document.getElementById("short-id").textContent = shortId(status.peer_id);
  document.getElementById("subtitle").textContent = `${status.peer_id ?? "?"} · network ${status.network_id ?? "?"}`;
  document.title = `p2pfl node ${shortId(status.peer_id)}`;
  renderTiles(status, target);
  renderCharts(history);
  renderPeers(status);
  renderRejected(record(status.rejected));
  renderRounds(history);
  return true;
}

function renderTiles(status, target) {
  const rejected = Object.values(record(status.rejected)).reduce((a, b) => a + b, 0);
  const tiles = [
    tile("state", status.state ?? "–", { id: "state", cls: `state-${status.state}` }),
    tile("round", `${status.round ?? "–"}${target}`, { id: "round" }),
    tile("accuracy", pct(status.accuracy), { id: "accuracy", note: "after the last round" }),
    tile("loss", num(status.loss, 4), { id: "loss" }),
    tile("neighbours", String(list(status.neighbours).length), { id: "neighbours" }),
    tile("traffic", `↓ ${bytes(status.bytes_in)}`, { id: "traffic", note: `↑ ${bytes(status.bytes_out)}` }),
    tile("updates", `${status.accepted ?? 0} used`, { id: "updates", note: `${rejected} rejected` }),
  ];
  if (known(status.epsilon_spent)) {
    tiles.push(tile("privacy ε spent", known(status.epsilon_spent) ? num(status.epsilon_spent, 2) : "–",
      { id: "epsilon", note: "differential privacy budget used" }));
  }
  if (status.byzantine) tiles.push(tile("attacker", String(status.byzantine), { id: "byzantine", cls: "byz" }));
  fill("tiles", tiles);
  document.getElementById("accuracy").dataset.value = String(status.accuracy);
}

function renderCharts(history) {
  const rounds = history.map((r) => r.round);
  const series = (key, label, cls, transform = (v) => v) => ({
    label, cls, points: rounds.map((x, i) => [x, transform(history[i][key])]),
  });
  lineChart(document.getElementById("accuracy-chart"), [series("accuracy", "accuracy", "c0")],
    { yMin: 0, yMax: 1, yFormat: (v) => `${Math.round(100 * v)}%` });
  lineChart(document.getElementById("loss-chart"), [series("loss", "loss", "c1")], { yMin: 0 });
  lineChart(document.getElementById("time-chart"), [series("duration", "seconds", "c2")], { yMin: 0, yFormat: (v) => v.toFixed(1) });
  const kb = (values) => deltas(values).map((v) => (known(v) ? v / 1e3 : null));
  const inKb = kb(history.map((r) => r.bytes_in));
  const outKb = kb(history.map((r) => r.bytes_out));
  lineChart(document.getElementById("traffic-chart"), [
    { label: "in", cls: "c0", points: rounds.map((x, i) => [x, inKb[i]]) },
    { label: "out", cls: "c3", dashed: true, points: rounds.map((x, i) => [x, outKb[i]]) },
  ], { yMin: 0, yFormat: (v) => v.toFixed(0) });
}

// A peer's standing in one word: what this node does with its updates.
export function standing(peer, connected) {
  if (peer.banned) return ["banned", "banned"];
  if (peer.weight === 0) return connected ? ["ignored", "ignored (weight 0)"] : ["dropped", "dropped"];
  return ["trusted", "trusted"];
}

function renderPeers(status) {
  const connected = new Set(list(status.neighbours).map(String));
  const scored = list(status.reputation).filter((p) => p && typeof p === "object").sort((a, b) => (b.score ?? 0) - (a.score ?? 0));
  const rows = scored.map((p) => {
    const [kind, text] = standing(p, connected.has(String(p.peer)));
    const peer = el("span", { class: "mono", title: String(p.peer), text: shortId(p.peer) });
    return el("tr", { class: `peer ${kind}`, "data-peer": String(p.peer) },
      cell(peer), cell(connected.has(String(p.peer)) ? "yes" : "no"),
      cell(scoreBar(p.score), "num"), cell(num(p.weight), "num"),
      cell(badge(kind, text)), cell(p.last_reason || "–", "reason"));
  });
  for (const peer of connected) {
    if (!scored.some((p) => String(p.peer) === peer)) {
      rows.push(el("tr", { class: "peer new", "data-peer": peer },
        cell(el("span", { class: "mono", title: peer, text: shortId(peer) })), cell("yes"),
        cell("–", "num"), cell("–", "num"), cell(badge("new", "not scored yet")), cell("–", "reason")));
    }
  }
  fill("peers", rows.length ? table(["peer", "connected", "reputation", "weight", "standing", "reason of the last change"], rows, { numeric: [2, 3] })
    : el("tbody", {}, el("tr", {}, el("td", { class: "empty", text: "no neighbour yet" }))));
  const gone = scored.filter((p) => p.banned || (p.weight === 0 && !connected.has(String(p.peer))));
  fill("gone", gone.length ? gone.map((p) => el("li", {},
    badge(standing(p, false)[0]), " ", el("span", { class: "mono", title: String(p.peer), text: shortId(p.peer) }),
    el("span", { class: "reason", text: p.last_reason || "no reason recorded" })))
    : el("li", { class: "empty", text: "nobody" }));
}

function scoreBar(score) {
  const box = el("span", { class: "score" });
  const bar = el("span", { class: "bar" });
  bar.style.width = `${Math.round(100 * Math.min(1, Math.max(0, known(score) ? score : 0)))}%`; // CSSOM: allowed by CSP
  box.append(el("span", { class: "track" }, bar), el("span", { text: num(score) }));
  return box;
}

function renderRejected(rejected) {
  const rows = Object.entries(rejected).sort((a, b) => b[1] - a[1])
    .map(([reason, count]) => el("tr", {}, cell(reason, "reason"), cell(String(count), "num")));
  fill("rejected", rows.length ? table(["reason", "messages"], rows, { numeric: [1] })
    : el("tbody", {}, el("tr", {}, el("td", { class: "empty", text: "none rejected" }))));
}

function renderRounds(history) {
  const recent = history.slice(-RECENT).reverse();
  const ins = deltas(history.map((r) => r.bytes_in)).slice(-RECENT).reverse();
  const outs = deltas(history.map((r) => r.bytes_out)).slice(-RECENT).reverse();
  const withEps = history.some((r) => known(r.epsilon_spent));
  const rows = recent.map((r, i) => el("tr", {},
    cell(String(r.round), "num"), cell(pct(r.accuracy), "num"), cell(num(r.loss, 4), "num"), cell(String(r.used ?? "–"), "num"),
    cell(num(r.duration, 2), "num"), cell(bytes(ins[i]), "num"), cell(bytes(outs[i]), "num"),
    withEps ? cell(num(r.epsilon_spent, 2), "num") : null));
  const headers = ["round", "accuracy", "loss", "updates used", "seconds", "in", "out", ...(withEps ? ["ε spent"] : [])];
  fill("rounds", rows.length ? table(headers, rows, { numeric: headers.map((_, i) => i) })
    : el("tbody", {}, el("tr", {}, el("td", { class: "empty", text: "no finished round yet" }))));
}

poll("/status", render);
