// Shared by both pages. Everything that came from the network is inserted as text
// (textContent, Text nodes, the title property), never parsed as markup.

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = 9; // colour classes c0..c8 (dashboard.css); red is kept for attackers

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  setProps(node, props);
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, props = {}) {
  const node = document.createElementNS(SVG, tag);
  setProps(node, props);
  return node;
}

function setProps(node, props) {
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "title") node.append(titleOf(node, value));
    else node.setAttribute(key, String(value)); // attribute names are ours, never data
  }
}

function titleOf(node, value) {
  if (node instanceof SVGElement) return svg("title", { text: value });
  node.title = String(value);
  return "";
}

export function fill(id, ...children) {
  document.getElementById(id).replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

// --------------------------------------------------------------------- formatting

export const list = (v) => (Array.isArray(v) ? v : []);
export const record = (v) => (v && typeof v === "object" && !Array.isArray(v) ? v : {});
export const known = (v) => typeof v === "number" && Number.isFinite(v);
export const pct = (v) => (known(v) ? `${(100 * v).toFixed(1)}%` : "–");
export const num = (v, digits = 2) => (known(v) ? v.toFixed(digits) : "–");
export function bytes(v) {
  if (!known(v)) return "–";
  for (const [unit, size] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
    if (Math.abs(v) >= size) return `${(v / size).toFixed(1)} ${unit}`;
  }
  return `${Math.round(v)} B`;
}
export const shortId = (peer) => String(peer ?? "?").slice(-8);
export function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds || 0));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}
export function deltas(cumulative) {
  return cumulative.map((v, i) => (known(v) ? v - (i > 0 && known(cumulative[i - 1]) ? cumulative[i - 1] : 0) : null));
}

// --------------------------------------------------------------------- widgets

export function tile(label, value, { id, note, cls } = {}) {
  return el("div", { class: `tile ${cls || ""}`.trim() },
    el("div", { class: "label", text: label }),
    el("div", { class: "value", id, text: value }),
    note ? el("div", { class: "note", text: note }) : null);
}

export function badge(kind, text) {
  return el("span", { class: `badge ${kind}`, text: text ?? kind });
}

export function table(headers, rows, { numeric = [] } = {}) {
  const head = el("thead", {}, el("tr", {}, headers.map((h, i) => el("th", { class: numeric.includes(i) ? "num" : null, text: h }))));
  const body = el("tbody", {}, rows);
  return [head, body];
}

export function cell(content, cls) {
  const td = el("td", { class: cls || null });
  td.append(content instanceof Node ? content : String(content ?? "–"));
  return td;
}

// A line chart in SVG, sized to its container in CSS pixels so text stays legible
// on a phone. series: [{points: [[x, y]], cls, dashed, width, label}]
export function lineChart(container, series, { yMin, yMax, yFormat = (v) => v.toFixed(2), empty = "no finished round yet" } = {}) {
  const width = Math.max(260, container.clientWidth || 600);
  const height = container.classList.contains("tall") ? 300 : 200;
  const pad = { left: 46, right: 12, top: 10, bottom: 28 };
  const points = series.flatMap((s) => s.points.filter(([, y]) => known(y)));
  if (!points.length) {
    container.replaceChildren(el("p", { class: "empty", text: empty }));
    return;
  }
  const xs = points.map(([x]) => x);
  const ys = points.map(([, y]) => y);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const ticks = niceTicks(yMin ?? Math.min(...ys), yMax ?? Math.max(...ys));
  const lo = ticks[0], hi = ticks[ticks.length - 1];
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y) => pad.top + (1 - (y - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", class: "plot" });
  for (const v of ticks) {
    root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: sy(v), y2: sy(v), class: "grid" }));
    root.append(svg("text", { x: pad.left - 6, y: sy(v) + 4, class: "tick end", text: yFormat(v) }));
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / Math.max(2, Math.floor((width - 60) / 50))));
  for (let x = Math.ceil(x0); x <= x1; x += step) {
    root.append(svg("text", { x: sx(x), y: height - 10, class: "tick mid", text: String(x) }));
  }
  for (const s of series) {
    const known_ = s.points.filter(([, y]) => known(y));
    if (!known_.length) continue;
    const d = known_.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    const g = svg("g", { class: `series ${s.cls || ""}`.trim() });
    g.append(svg("path", { d, class: `line${s.dashed ? " dashed" : ""}${s.bold ? " bold" : ""}` }));
    for (const [x, y] of known_) {
      g.append(svg("circle", { cx: sx(x), cy: sy(y), r: s.bold ? 0 : 2.5, title: `${s.label}: round ${x}, ${yFormat(y)}` }));
    }
    root.append(g);
  }
  container.replaceChildren(root);
}

// About five round numbers from lo to hi (at least), in steps of 1, 2, 2.5 or 5 x 10^k.
function niceTicks(lo, hi) {
  if (!(hi > lo)) hi = lo + (Math.abs(lo) || 1);
  const raw = (hi - lo) / 4;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v < hi + step - 1e-9 * step; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

// --------------------------------------------------------------------- polling

// Fetch `path` every `interval` ms and hand the JSON to `render`; `render` returns false
// to stop (the data is final). The live indicator says how fresh the page is.
export function poll(path, render, interval = 1000) {
  const live = document.getElementById("live");
  let last = 0;
  let stopped = false;
  let data = null;
  window.addEventListener("resize", () => data && render(data)); // charts are sized in pixels
  async function tick() {
    let fresh = null;
    try {
      const response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      fresh = await response.json();
    } catch (error) {
      live.className = "live down";
      live.textContent = last ? `disconnected (last update ${new Date(last).toLocaleTimeString()})` : "waiting for the node…";
    }
    try {
      if (fresh !== null) {
        data = fresh;
        last = Date.now();
        stopped = render(data) === false; // a bug here reaches the console, not the indicator
        live.className = stopped ? "live final" : "live ok";
        live.textContent = stopped ? "final" : "live";
      }
    } finally {
      if (!stopped) setTimeout(tick, interval);
    }
  }
  tick();
}
