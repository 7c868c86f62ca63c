// The page: the models from /v1/models, a prompt sent to one model or to auto and moe side by
// side (streamed, with the router's decision and each token's gate weights), stop, load / unload.

import { ServerError, getJSON, health, postJSON, streamChat } from "./api.js";
import { drawLegend, makePanel, showToken } from "./view.js";

const $ = (id) => document.getElementById(id);
const page = {
  models: [],
  server: {},
  running: null, // AbortController of the request(s) in flight
};

function showError(words) {
  $("error").textContent = words;
  $("error").hidden = !words;
}

function option(value, text = value) {
  const node = document.createElement("option");
  node.value = value;
  node.textContent = text;
  return node;
}

function byKind(kind) {
  return page.models.filter((m) => m.loralab?.kind === kind).map((m) => m.id);
}

// Fill the two selects, keeping what was chosen when it is still served.
function fillSelects() {
  const mode = $("mode");
  const extra = $("extra");
  const [was, wasExtra] = [mode.value, extra.value];
  const comparable = [...byKind("router"), ...byKind("moe")];
  const fixed = ["base", ...byKind("lora")];
  mode.replaceChildren();
  if (comparable.length) {
    mode.append(option("compare", `compare: ${comparable.join(" and ")} side by side`));
  }
  for (const id of [...comparable, ...fixed]) mode.append(option(id));
  extra.replaceChildren(option("", "nothing else"), ...fixed.map((id) => option(id)));
  if ([...mode.options].some((o) => o.value === was)) mode.value = was;
  if ([...extra.options].some((o) => o.value === wasExtra)) extra.value = wasExtra;
  $("extra-label").hidden = mode.value !== "compare";
}

function describe(card) {
  const info = card.loralab ?? {};
  if (info.kind === "router") return `labels: ${info.labels.join(", ")}`;
  if (info.kind === "moe") return `gate over: ${info.experts.join(", ")}`;
  if (info.kind === "lora") {
    return `folder ${card.root}; ${info.resident ? "resident" : "evicted"}${info.pinned ? ", pinned" : ""}`;
  }
  return card.root ?? "";
}

function fillModelTable() {
  const rows = page.models.map((card) => {
    const row = document.createElement("tr");
    row.dataset.model = card.id;
    for (const text of [card.id, card.loralab?.kind ?? "", describe(card)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    const action = document.createElement("td");
    if (card.loralab?.kind === "lora" && !card.loralab.pinned && page.server.runtime_lora_updating) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Unload";
      button.addEventListener("click", () => unload(card.id));
      action.append(button);
    }
    row.append(action);
    return row;
  });
  $("models").replaceChildren(...rows);
  $("load").hidden = !page.server.runtime_lora_updating;
  $("admin-key").parentElement.hidden = !page.server.load_needs_key;
}

async function refreshModels() {
  try {
    const list = await getJSON("/v1/models", $("api-key").value);
    page.models = list.data;
    page.server = list.loralab ?? {};
    fillSelects();
    fillModelTable();
    if (page.server.gate_slots) drawLegend($("legend"), page.server.gate_slots);
    if (/API key|not reachable/.test($("error").textContent)) showError("");
    return true;
  } catch (error) {
    showError(error.message);
    return false;
  }
}

async function adminCall(path, body, done) {
  $("load-result").textContent = "…";
  try {
    await postJSON(path, body, $("admin-key").value || $("api-key").value);
    $("load-result").textContent = done;
    await refreshModels();
  } catch (error) {
    $("load-result").textContent = error.message;
  }
}

function unload(name) {
  return adminCall("/v1/unload_lora_adapter", { lora_name: name }, `unloaded ${name}`);
}

function load(event) {
  event.preventDefault();
  const name = $("load-name").value.trim();
  const body = { lora_name: name, lora_path: $("load-path").value.trim() };
  return adminCall("/v1/load_lora_adapter", body, `loaded ${name}`);
}

function targets() {
  const mode = $("mode").value;
  if (mode !== "compare") return [mode];
  const chosen = [...byKind("router"), ...byKind("moe")];
  if ($("extra").value) chosen.push($("extra").value);
  return chosen;
}

function stats(tokens, sent, first, reason) {
  const now = performance.now();
  const parts = [`${tokens} tokens`];
  if (first !== null) {
    parts.push(`first token ${(first - sent).toFixed(0)} ms`);
    if (tokens > 1 && now > first) {
      parts.push(`${((tokens - 1) / ((now - first) / 1000)).toFixed(1)} tokens/s`);
    }
  }
  if (reason) parts.push(`finish: ${reason}`);
  return parts.join(" · ");
}

// One model's streamed answer into its panel; errors stay in that panel.
async function runOne(model, messages, signal) {
  const panel = makePanel($("answers"), model, (token) => showToken($("token-detail"), token));
  const body = {
    model,
    messages,
    max_tokens: Number($("max-tokens").value) || undefined,
    temperature: Number($("temperature").value),
    return_gate_weights: true,
  };
  const sent = performance.now();
  let first = null;
  let slots = page.server.gate_slots ?? [];
  let tokens = 0;
  let reason = null;
  panel.setState("sending…", "waiting");
  try {
    await streamChat(body, $("api-key").value, signal, (chunk) => {
      if (chunk.route) panel.showRoute(chunk.route);
      if (chunk.gate_slots) {
        slots = chunk.gate_slots;
        drawLegend($("legend"), slots);
      }
      const choice = chunk.choices?.[0];
      if (!choice) return;
      const text = choice.delta?.content ?? "";
      if (choice.gate_weights) {
        tokens += 1;
        first ??= performance.now();
        if (text) panel.addToken(text, choice.gate_weights, slots);
        panel.setState("streaming…", "streaming");
      } else {
        panel.addText(text);
      }
      if (choice.finish_reason) reason = choice.finish_reason;
      panel.setStats(stats(tokens, sent, first, reason));
    });
    panel.setState("done", "done");
  } catch (error) {
    if (error.name === "AbortError") {
      panel.setState("stopped", "stopped");
    } else {
      panel.setState("failed", "failed");
      panel.setError(error instanceof ServerError ? error.message : String(error));
    }
  }
  panel.setStats(stats(tokens, sent, first, reason));
}

async function send(event) {
  event?.preventDefault();
  if (page.running) return;
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    showError("Type a prompt first.");
    return;
  }
  showError("");
  $("answers").replaceChildren();
  $("token-detail").hidden = true;
  const controller = new AbortController();
  page.running = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  $("answers").dataset.state = "running";
  const messages = [{ role: "user", content: prompt }];
  try {
    await Promise.all(targets().map((model) => runOne(model, messages, controller.signal)));
  } finally {
    page.running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    $("answers").dataset.state = "idle";
  }
}

async function watchHealth() {
  const status = await health();
  const node = $("server-status");
  const back = status === "ok" && node.dataset.status && node.dataset.status !== "ok";
  node.textContent = status === "ok" ? "server: ok" : `server: ${status}`;
  node.dataset.status = status;
  if (back) refreshModels(); // a restarted server may serve other adapters
}

function start() {
  $("ask").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  });
  $("stop").addEventListener("click", () => page.running?.abort());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") page.running?.abort();
  });
  $("mode").addEventListener("change", () => {
    $("extra-label").hidden = $("mode").value !== "compare";
  });
  $("api-key").addEventListener("change", refreshModels);
  $("load").addEventListener("submit", load);
  watchHealth();
  setInterval(watchHealth, 5000);
  refreshModels().then(() => {
    document.body.dataset.ready = "true";
  });
}

start();
