// The server's HTTP API for the page: JSON calls, the chat stream (server-sent events) and
// server errors in plain words.

export class ServerError extends Error {
  constructor(words, status = null) {
    super(words);
    this.status = status;
  }
}

const UNREACHABLE =
  "The server is not reachable: is `python scripts/serve.py` still running?";

function headers(key) {
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// An error body ({"error": {"message", ...}}) and its HTTP status, in words a person reads.
export function explain(status, body, retryAfter = null) {
  const message = body?.error?.message ?? `HTTP ${status}`;
  if (status === 401) return `The server needs an API key (enter it above): ${message}`;
  if (status === 403) return `Not allowed: ${message}`;
  if (status === 404) return `Unknown model or adapter: ${message}`;
  if (status === 503 && /queue is full/.test(message)) {
    const wait = retryAfter ? ` Try again in ${retryAfter} s.` : "";
    return `The server is busy: its request queue is full.${wait}`;
  }
  if (status === 503) return `The server cannot serve this now: ${message}`;
  if (status === 400) return `The server refused the request: ${message}`;
  if (status >= 500) return `The generation failed on the server: ${message}`;
  return message;
}

async function call(path, { method = "GET", body = null, key = "", signal = null } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(key),
      body: body === null ? null : JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ServerError(UNREACHABLE);
  }
  if (!response.ok) {
    let parsed = null;
    try {
      parsed = await response.json();
    } catch {
      parsed = null;
    }
    const words = explain(response.status, parsed, response.headers.get("retry-after"));
    throw new ServerError(words, response.status);
  }
  return response;
}

export async function getJSON(path, key) {
  return (await call(path, { key })).json();
}

export async function postJSON(path, body, key) {
  return (await call(path, { method: "POST", body, key })).json();
}

export async function health() {
  try {
    const response = await fetch("/health");
    return response.ok ? "ok" : "engine stopped";
  } catch {
    return "unreachable";
  }
}

// Stream a chat completion; onChunk(parsed chunk) for each `data:` event until [DONE].
// Resolves when the stream ends; rejects with ServerError (words) or an AbortError (stopped).
export async function streamChat(body, key, signal, onChunk) {
  const response = await call("/v1/chat/completions", {
    method: "POST",
    body: { ...body, stream: true },
    key,
    signal,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let part;
    try {
      part = await reader.read();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ServerError("The connection to the server broke off mid-answer.");
    }
    if (part.done) throw new ServerError("The server closed the stream before its end.");
    buffer += decoder.decode(part.value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ServerError(explain(chunk.error.code, chunk), chunk.error.code);
        onChunk(chunk);
      }
    }
  }
}
