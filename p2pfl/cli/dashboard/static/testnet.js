// The test network's page: /network (every node's last /status plus the live report),
// polled every second until the launcher says the run is over.
import { PALETTE, badge, bytes, cell, duration, el, fill, known, lineChart, list, num, pct, poll, record, shortId, table } from "./common.js";

const nodeName = (node) => `n${node.index}`;

function render(doc) {
  const report = record(doc.report);
  const nodes = list(report.nodes);
  const statuses = list(doc.statuses);
  const meta = record(doc.meta);
  const attack = meta.attack ? ` · ${meta.byzantine} × ${meta.attack}` : "";
  document.getElementById("subtitle").textContent =
    `${nodes.length} nodes · ${meta.rounds} rounds · ${meta.rule} · ${meta.partition}${attack} · ` +
    `${duration(doc.elapsed)} of ${duration(meta.timeout)}`;
  renderVerdict(doc, report);
  renderChart(nodes, report.per_round || []);
  renderNodes(nodes, statuses, list(doc.processes), meta.rounds);
  const reasons = reasonsBy(statuses);
  renderMatrix(nodes, report.reputation || {}, reasons);
  renderIgnored(nodes, report.reputation || {}, report.detection || {}, reasons);
  return !doc.final;
}

// observer peer id -> scored peer id -> its reputation row (banned, last_reason)
function reasonsBy(statuses) {
  const by = new Map();
  for (const status of statuses) {
    if (!status) continue;
    by.set(String(status.peer_id), new Map(list(status.reputation).map((p) => [String(p.peer), p])));
  }
  return by;
}

function renderVerdict(doc, report) {
  const v = report.verdict || {};
  const flagged = v.attackers ? `${v.attackers_flagged}/${v.attackers}` : "no attackers";
  fill("verdict",
    el("h2", {}, doc.final ? "Verdict " : "So far",
      doc.final ? el("span", { id: "outcome", class: `badge outcome ${doc.outcome}`, text: doc.outcome })
        : el("span", { class: "muted", text: " (the verdict comes when every node is done)" })),
    el("div", { class: "tiles" },
      verdictTile("honest accuracy, mean", pct(v.honest_mean_accuracy), "verdict-mean"),
      verdictTile("honest accuracy, min", pct(v.honest_min_accuracy), "verdict-min"),
      verdictTile("attackers ignored", flagged, "verdict-flagged",
        v.attackers && v.attackers_flagged === v.attackers ? "good" : v.attackers ? "bad" : ""),
      verdictTile("honest peers wrongly ignored", String(v.honest_zeroed ?? 0), "verdict-zeroed", v.honest_zeroed ? "bad" : "good")));
}

function verdictTile(label, value, id, cls = "") {
  return el("div", { class: `tile ${cls}`.trim() }, el("div", { class: "label", text: label }), el("div", { class: "value", id, text: value }));
}

function colour(node) {
  return node.role === "byzantine" ? "byz" : `c${node.index % PALETTE}`;
}

function renderChart(nodes, perRound) {
  const series = nodes.map((n) => ({
    label: `${nodeName(n)} ${n.short_id}${n.role === "byzantine" ? " (attacker)" : ""}`,
    cls: colour(n), dashed: n.role === "byzantine",
    points: (n.rounds || []).map((r, i) => [r, n.accuracy[i]]),
  }));
  series.push({ label: "honest mean", cls: "mean", bold: true, points: perRound.map((r) => [r.round, r.honest_mean_accuracy]) });
  lineChart(document.getElementById("accuracy-chart"), series, { yMin: 0, yMax: 1, yFormat: (v) => `${Math.round(100 * v)}%` });
  fill("legend", series.map((s) => el("li", { class: s.cls }, el("span", { class: `swatch${s.dashed ? " dashed" : ""}` }), s.label)));
}

function renderNodes(nodes, statuses, processes, rounds) {
  const withEps = statuses.some((s) => s && known(s.epsilon_spent));
  const rows = nodes.map((n, i) => {
    const status = statuses[i] || {};
    const exit = processes[i] && processes[i].exit_code;
    const state = exit !== null && exit !== undefined ? `exited (${exit})` : status.state || "launching";
    const role = n.role === "byzantine" ? badge("byz", `attacker: ${n.attack || "?"}`) : badge("honest", "honest");
    const accuracy = cell(pct(status.accuracy), "num accuracy");
    accuracy.dataset.value = String(status.accuracy);
    return el("tr", { class: `node ${n.role}`, "data-peer": String(n.peer_id), "data-index": String(n.index) },
      cell(nodeName(n)), cell(el("span", { class: "mono", title: String(n.peer_id), text: n.short_id })), cell(role),
      cell(state, "state"), cell(`${Math.min(rounds, status.round ?? 0)}/${rounds}`, "num"), accuracy,
      cell(num(status.loss, 3), "num"), cell(String(list(status.neighbours).length), "num"),
      cell(bytes(status.bytes_in), "num"), cell(bytes(status.bytes_out), "num"),
      withEps ? cell(num(status.epsilon_spent, 2), "num") : null);
  });
  const headers = ["#", "peer", "role", "state", "rounds", "accuracy", "loss", "peers", "in", "out", ...(withEps ? ["ε spent"] : [])];
  fill("nodes", table(headers, rows, { numeric: [4, 5, 6, 7, 8, 9, 10] }));
}

function renderMatrix(nodes, rep, reasons) {
  const byId = new Map(nodes.map((n) => [String(n.peer_id), n]));
  const peers = (rep.peers || []).map(String);
  const head = el("tr", {}, el("th", { text: "↓ scores →" }), peers.map((p) => {
    const n = byId.get(p);
    return el("th", { class: n && n.role === "byzantine" ? "byz-col" : null, title: p },
      n ? nodeName(n) : shortId(p), n && n.role === "byzantine" ? el("span", { class: "flag", text: " attacker" }) : null);
  }));
  const rows = (rep.observers || []).map((o, r) => el("tr", {},
    el("th", { title: String(o) }, byId.has(String(o)) ? nodeName(byId.get(String(o))) : shortId(o)),
    peers.map((p, c) => matrixCell(String(o), p, rep.score[r][c], rep.weight[r][c], reasons, byId.get(p)))));
  fill("matrix", el("thead", {}, head), el("tbody", {}, rows));
}

function matrixCell(observer, peer, score, weight, reasons, node) {
  const attacker = node && node.role === "byzantine" ? " byz-col" : "";
  if (observer === peer) return el("td", { class: `self${attacker}`, text: "self" });
  if (!known(score)) return el("td", { class: `none${attacker}`, text: "–", title: "no score yet" });
  const row = (reasons.get(observer) || new Map()).get(peer) || {};
  const mark = row.banned ? " ⊘" : weight === 0 ? " ×" : "";
  const bucket = Math.max(0, Math.min(10, Math.round(10 * score)));
  const title = `${shortId(observer)} → ${shortId(peer)}: score ${num(score)}, weight ${num(weight)}` +
    `${row.banned ? ", banned" : ""}; last: ${row.last_reason || "–"}`;
  return el("td", { class: `r${bucket}${weight === 0 ? " zero" : ""}${attacker}`, title }, num(score), mark);
}

function renderIgnored(nodes, rep, detection, reasons) {
  const items = [];
  (rep.peers || []).forEach((peer, c) => {
    const node = nodes.find((n) => String(n.peer_id) === String(peer));
    const by = (rep.observers || []).filter((o, r) => String(o) !== String(peer) && rep.weight[r][c] === 0);
    const holders = (rep.observers || []).filter((o, r) => String(o) !== String(peer) && known(rep.weight[r][c]));
    if (!by.length) return;
    const why = new Map();
    for (const o of by) {
      const row = (reasons.get(String(o)) || new Map()).get(String(peer)) || {};
      const reason = `${row.banned ? "banned: " : ""}${row.last_reason || "low reputation"}`;
      why.set(reason, [...(why.get(reason) || []), o]);
    }
    const attacker = node && node.role === "byzantine";
    items.push(el("li", { class: `ignored-peer ${attacker ? "byzantine" : "honest"}`, "data-peer": String(peer) },
      badge(attacker ? "byz" : "bad", attacker ? `attacker: ${node.attack || "?"}` : "honest!"), " ",
      el("b", { text: node ? `${nodeName(node)} ${node.short_id}` : shortId(peer) }),
      el("span", { class: "muted", text: ` ignored by ${by.length}/${holders.length} honest nodes` }),
      el("ul", {}, [...why].map(([reason, observers]) => el("li", {},
        el("span", { class: "reason", text: reason }),
        el("span", { class: "muted", text: ` (${observers.map((o) => shortId(o)).join(", ")})` }))))));
  });
  const missed = Object.entries(detection.attackers || {}).filter(([, d]) => !d.flagged).map(([peer]) => peer);
  for (const peer of missed) {
    const node = nodes.find((n) => String(n.peer_id) === String(peer));
    if (items.some((li) => li.dataset.peer === String(peer))) continue;
    items.push(el("li", { class: "ignored-peer missed" }, badge("bad", "not caught"), " ",
      el("b", { text: node ? `${nodeName(node)} ${node.short_id}` : shortId(peer) }),
      el("span", { class: "muted", text: " attacker still trusted by every honest node" })));
  }
  fill("ignored", items.length ? items : el("li", { class: "empty", text: "nobody is ignored" }));
}

poll("/network", render);
