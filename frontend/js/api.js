// The gateway's REST and Server-Sent Events, as plain functions. Nothing else talks to the server.

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function check(response) {
  if (response.ok) return response;
  let detail = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    detail = describe(body.detail) ?? detail;
  } catch {
    // not JSON: keep the status line
  }
  throw new ApiError(response.status, detail);
}

// FastAPI's 422 detail is a list of {loc, msg}; everything else here is a sentence.
function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc ?? []).slice(1).join(".") || "body"}: ${d.msg}`).join("; ");
  }
  return null;
}

function request(method, body, signal) {
  const init = { method, signal, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  return init;
}

// The API key, when the server asks for one: kept in this browser, sent with every request.
const KEY = "sma-api-key";
let asking = null; // one dialog for every request that was refused meanwhile

async function send(path, init) {
  for (;;) {
    const key = localStorage.getItem(KEY);
    if (key) init.headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, init);
    if (response.status !== 401) return check(response);
    const refusal = await check(response).catch((error) => error);
    if (localStorage.getItem(KEY) !== key) continue; // a new key came meanwhile: try it
    asking ??= askForKey(key ? refusal.message : "").finally(() => (asking = null));
    if (!(await asking)) throw refusal;
  }
}

function askForKey(problem) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  const error = document.getElementById("key-error");
  error.textContent = problem;
  error.hidden = !problem;
  input.value = "";
  dialog.returnValue = "";
  // Cancel is no submit button, so that Enter in the field means "Use this key"
  document.getElementById("key-cancel").onclick = () => dialog.close("cancel");
  dialog.showModal();
  input.focus();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const key = input.value.trim();
        if (dialog.returnValue === "ok" && key) localStorage.setItem(KEY, key);
        resolve(dialog.returnValue === "ok" && key !== "");
      },
      { once: true },
    );
  });
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const response = await send(path, request(method, body, signal));
  return response.status === 204 ? null : response.json();
}

// Server-Sent Events over fetch (EventSource can only GET): yields {event, data} as they arrive.
// Aborting `signal` closes the connection, which the gateway turns into a cancelled stream.
export async function* events(path, { method = "GET", body, signal } = {}) {
  const init = request(method, body, signal);
  init.headers.Accept = "text/event-stream";
  const response = await send(path, init);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parse(block);
        if (event) yield event;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parse(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
}

// Says `text` to screen readers (one polite live region for the whole page).
export function announce(text) {
  const region = document.getElementById("announce");
  if (region.textContent === text) region.textContent = "";
  region.textContent = text;
}
