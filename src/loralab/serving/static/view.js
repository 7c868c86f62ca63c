// Drawing: expert colours and legend, one answer panel per model, the router's decision,
// tokens coloured by their dominant expert, and a token's weights per slot and per layer.

const NO_EXPERT = "none";
const KNOWN = { law: "#2563eb", code: "#059669", medical: "#dc2626", [NO_EXPERT]: "#9ca3af" };
const MORE = ["#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#9333ea"];
const assigned = new Map();

export function colour(slot) {
  if (slot in KNOWN) return KNOWN[slot];
  if (!assigned.has(slot)) assigned.set(slot, MORE[assigned.size % MORE.length]);
  return assigned.get(slot);
}

function rgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha.toFixed(3)})`;
}

function el(tag, className = "", text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

// The slot whose mean weight is largest; "none" when every weight is 0 (base) or the null slot wins.
export function dominant(slots, mean) {
  let best = -1;
  let top = 0;
  mean.forEach((w, i) => {
    if (w > top) [best, top] = [i, w];
  });
  return { slot: best < 0 ? NO_EXPERT : slots[best], weight: top };
}

export function drawLegend(section, slots) {
  section.replaceChildren(el("span", "legend-title", "Token colour = its dominant expert:"));
  const names = slots.includes(NO_EXPERT) ? slots : [...slots, NO_EXPERT];
  for (const slot of names) {
    const item = el("span", "legend-item");
    item.dataset.slot = slot;
    const swatch = el("span", "swatch");
    swatch.style.backgroundColor = colour(slot);
    item.append(swatch, slot === NO_EXPERT ? "no expert" : slot);
    section.append(item);
  }
  section.hidden = false;
}

// One answer column: {root, setState, showRoute, addToken, addText, setStats, setError}.
export function makePanel(container, model, onToken) {
  const root = el("article", "panel");
  root.dataset.model = model;
  const title = el("h2", "", model);
  const state = el("span", "state", "waiting");
  title.append(" ", state);
  const route = el("div", "route");
  route.hidden = true;
  const answer = el("p", "answer");
  const stats = el("p", "stats muted");
  const error = el("p", "error");
  error.setAttribute("role", "alert");
  error.hidden = true;
  root.append(title, route, answer, stats, error);
  container.append(root);
  const tokens = [];

  return {
    root,
    tokens,
    setState(words, kind) {
      state.textContent = words;
      root.dataset.state = kind;
    },
    showRoute(info) {
      route.replaceChildren(...routeView(info));
      route.hidden = false;
    },
    addToken(text, gate, slots) {
      const { slot, weight } = dominant(slots, gate.mean);
      const span = el("span", "tok", text);
      span.tabIndex = 0;
      span.dataset.slot = slot;
      span.dataset.weight = weight.toFixed(3);
      span.dataset.index = String(tokens.length);
      if (!text.trim() && text.includes("\n")) span.classList.add("newline"); // shown as ↵
      span.style.backgroundColor = rgba(colour(slot), 0.15 + 0.55 * weight);
      const token = { text, gate, slots, model, index: tokens.length, span };
      tokens.push(token);
      for (const kind of ["mouseenter", "focus", "click"]) {
        span.addEventListener(kind, () => onToken(token));
      }
      answer.append(span);
    },
    addText(text) {
      if (text) answer.append(document.createTextNode(text));
    },
    setStats(words) {
      stats.textContent = words;
    },
    setError(words) {
      error.textContent = words;
      error.hidden = false;
    },
  };
}

function bar(label, value, fill, className = "bar-row") {
  const row = el("div", className);
  row.dataset.label = label;
  const name = el("span", "bar-label", label);
  const track = el("span", "bar-track");
  const level = el("span", "bar-fill");
  level.style.width = `${(100 * value).toFixed(1)}%`;
  level.style.backgroundColor = fill;
  track.append(level);
  row.append(name, track, el("span", "bar-value", value.toFixed(2)));
  return row;
}

// The router's decision (auto), or the fixed routing of the other models.
function routeView(info) {
  if (!info.label) {
    const how =
      info.model === "moe"
        ? "the trained gate mixes the experts per token and per layer"
        : info.model === "base"
          ? "the base model, no adapter"
          : `the ${info.model} adapter for every token`;
    return [el("p", "route-line", `served by ${info.model}: ${how}`)];
  }
  const line = el("p", "route-line");
  const chosen = el("strong", "route-label", info.label);
  line.append("router chose ", chosen, ` → ${info.model}`);
  const reason = el("span", "route-reason", info.reason);
  reason.dataset.reason = info.reason;
  line.append(" · ", reason, ` · margin ${Number(info.margin).toFixed(2)}`);
  line.append(` · decided in ${Number(info.latency_ms).toFixed(1)} ms`);
  const bars = el("div", "bars route-probs");
  const probs = Object.entries(info.probs).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of probs) {
    bars.append(bar(label, p, colour(label === "base" ? NO_EXPERT : label)));
  }
  return [line, bars];
}

// The selected token: its weights per slot (mean over blocks) and one stacked column per block.
export function showToken(section, token) {
  document.querySelectorAll(".tok.selected").forEach((s) => s.classList.remove("selected"));
  token.span.classList.add("selected");
  section.querySelector("#token-text").textContent = JSON.stringify(token.text);
  section.querySelector("#token-where").textContent =
    `${token.model}, token ${token.index + 1}`;
  const weights = section.querySelector("#token-weights");
  weights.replaceChildren(
    ...token.slots.map((slot, i) => bar(slot, token.gate.mean[i], colour(slot), "bar-row weight")),
  );
  const strip = section.querySelector("#token-layers");
  strip.replaceChildren(
    ...token.gate.layers.map((layer, block) => {
      const column = el("span", "layer");
      column.title = `block ${block}: ${token.slots
        .map((s, i) => `${s} ${layer[i].toFixed(2)}`)
        .join(", ")}`;
      layer.forEach((w, i) => {
        const part = el("span", "layer-part");
        part.style.height = `${(100 * w).toFixed(1)}%`;
        part.style.backgroundColor = colour(token.slots[i]);
        column.append(part);
      });
      return column;
    }),
  );
  section.hidden = false;
}
