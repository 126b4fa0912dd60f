// The chat: a conversation kept in the browser, sent as one prompt, the reply streamed by SSE.
//
// A model trained here is a plain language model: it continues text. A conversation is then one
// document: each message starts a new paragraph and each reply continues it. An imported instruct
// model has a chat template of its own (/health says "own"): the conversation is then sent as
// `messages`, which the server renders with that template. Before sending, the oldest turns are
// dropped until the prompt fits the model's context, estimated from the characters-per-token
// ratio the server's own usage reports.

import { ApiError, events } from "./api.js";

const STORE = "sma.conversation";
const SETTINGS = "sma.settings";
const KEEP_TURNS = 200;

const $ = (id) => document.getElementById(id);
const log = $("log");
const form = $("chat-form");
const prompt = $("prompt");
const send = $("send");
const stop = $("stop");
const errorBox = $("chat-error");
const fields = {
  max_new_tokens: $("max-tokens"),
  temperature: $("temperature"),
  top_k: $("top-k"),
  top_p: $("top-p"),
};

export class Chat {
  constructor({ takeRouting, restoreRouting, onReply, onClear }) {
    this.takeRouting = takeRouting;
    this.restoreRouting = restoreRouting;
    this.onReply = onReply;
    this.onClear = onClear;
    this.turns = load(STORE, []); // [{role: "user" | "model", text, meta?}]
    this.charsPerToken = 2.5; // refined from every reply's usage
    this.context = null;
    this.ownTemplate = false; // the model's own chat template renders `messages`
    this.controller = null;
    for (const turn of this.turns) this.render(turn);
    this.restoreSettings();
    this.bind();
  }

  bind() {
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.send();
      }
    });
    stop.addEventListener("click", () => this.controller?.abort());
    $("new-chat").addEventListener("click", () => this.clear());
    for (const input of Object.values(fields)) {
      input.addEventListener("change", () => this.saveSettings());
    }
  }

  // The model's context (tokens), from /health: bounds max tokens and the prompt budget.
  setContext(context) {
    if (!context || context === this.context) return;
    this.context = context;
    fields.max_new_tokens.max = String(context - 1);
    // The server's default (64, or half the context) unless the user chose a value that fits.
    const chosen = load(SETTINGS, {}).max_new_tokens;
    if (!chosen || Number(chosen) > context - 1) {
      fields.max_new_tokens.value = String(Math.min(64, Math.floor(context / 2)));
    }
  }

  // "own" when the serving model has a chat template of its own (from /health).
  setChatTemplate(kind) {
    this.ownTemplate = kind === "own";
  }

  // The generation settings, or a sentence saying which one is out of range.
  settings() {
    const maxTokens = this.context ? this.context - 1 : 100_000;
    const rules = {
      max_new_tokens: [Number.isInteger, 1, maxTokens, `a whole number from 1 to ${maxTokens}`],
      temperature: [Number.isFinite, 0, 100, "a number from 0 to 100"],
      top_k: [Number.isInteger, 0, 1_000_000, "a whole number, 0 or more"],
      top_p: [Number.isFinite, Number.MIN_VALUE, 1, "a number above 0, at most 1"],
    };
    const values = {};
    for (const [key, [valid, low, high, what]] of Object.entries(rules)) {
      const value = Number(fields[key].value);
      if (fields[key].value.trim() === "" || !valid(value) || value < low || value > high) {
        const name = fields[key].closest("label").firstChild.textContent.trim();
        return { error: `${name} must be ${what}.` };
      }
      values[key] = value;
    }
    return { values };
  }

  saveSettings() {
    const values = Object.fromEntries(Object.entries(fields).map(([k, el]) => [k, el.value]));
    try {
      localStorage.setItem(SETTINGS, JSON.stringify(values));
    } catch {
      // not kept across reloads, still used
    }
  }

  restoreSettings() {
    for (const [key, value] of Object.entries(load(SETTINGS, {}))) {
      if (fields[key] && value !== "") fields[key].value = value;
    }
  }

  // The prompt for `message`: as many of the latest turns as fit, then the message.
  buildPrompt(message, maxNewTokens) {
    const pieces = [];
    for (const turn of this.turns) {
      pieces.push(turn.role === "user" && pieces.length ? `\n\n${turn.text}` : turn.text);
    }
    pieces.push(pieces.length ? `\n\n${message}` : message);
    let dropped = 0;
    if (this.context) {
      const budget = Math.max(1, this.context - (maxNewTokens ?? 64)) * this.charsPerToken;
      let size = pieces.reduce((n, p) => n + p.length, 0);
      while (pieces.length > 1 && size > budget) {
        size -= pieces.shift().length;
        dropped += 1;
      }
      if (dropped) pieces[0] = pieces[0].replace(/^\n\n/, "");
    }
    const messages = [
      ...this.turns.slice(dropped).map((t) => ({
        role: t.role === "user" ? "user" : "assistant",
        content: t.text,
      })),
      { role: "user", content: message },
    ];
    return { text: pieces.join(""), messages, dropped };
  }

  async send() {
    const message = prompt.value.trim();
    if (!message || this.controller) return;
    const { values: params, error } = this.settings();
    this.showError(error);
    if (error) return;
    const turns = this.turns; // "New conversation" during the reply replaces it
    const routing = this.takeRouting();
    const { text, messages, dropped } = this.buildPrompt(message, params.max_new_tokens);
    const user = { role: "user", text: message };
    const reply = { role: "model", text: "", meta: { streaming: true } };
    const userEl = this.render(user);
    const replyEl = this.render(reply);
    prompt.value = "";
    this.busy(true);
    this.controller = new AbortController();
    const body = this.ownTemplate
      ? { messages, ...params, routing }
      : { prompt: text, ...params, routing };
    let done = null;
    try {
      for await (const { event, data } of events("/generate/stream", {
        method: "POST",
        body,
        signal: this.controller.signal,
      })) {
        if (event === "token") {
          reply.text += data.text;
          replyEl.querySelector(".text").textContent = reply.text;
          log.scrollTop = log.scrollHeight;
        } else if (event === "done") {
          done = data;
        } else if (event === "error") {
          throw new ApiError(data.status, data.detail);
        }
      }
      if (!done) throw new ApiError(502, "the stream ended before the reply was complete");
      reply.meta = summarize(done, dropped, routing);
      this.learnRatio(done.prompt ?? text, done.usage);
    } catch (err) {
      if (err.name === "AbortError") {
        reply.meta = { stopped: true };
      } else if (!reply.text) {
        // Nothing came back: take the turn away and give the message back to edit or resend.
        userEl.remove();
        replyEl.remove();
        if (!prompt.value.trim()) prompt.value = message;
        this.restoreRouting(routing);
        this.showError(explain(err));
        return;
      } else {
        reply.meta = { failed: explain(err) };
      }
    } finally {
      this.controller = null;
      this.busy(false);
    }
    if (this.turns !== turns) return; // cleared meanwhile: the exchange went with it
    this.turns.push(user, reply);
    this.save();
    this.renderMeta(replyEl, reply.meta);
    if (done) this.onReply({ prompt: done.prompt ?? text, completion: reply.text, done, routing });
  }

  learnRatio(text, usage) {
    const tokens = (usage?.prompt_tokens ?? 0) + (usage?.truncated_prompt_tokens ?? 0);
    if (tokens > 8) this.charsPerToken = Math.max(1, text.length / tokens);
  }

  busy(on) {
    send.disabled = on;
    stop.hidden = !on;
    log.setAttribute("aria-busy", String(on));
    const active = document.activeElement;
    if (!on && (active === document.body || active === stop || active === send)) prompt.focus();
  }

  clear() {
    this.controller?.abort();
    this.turns = [];
    this.save();
    log.replaceChildren();
    this.showError(null);
    this.onClear();
    prompt.focus();
  }

  // Keeps the latest turns; a full or disabled storage only loses persistence.
  save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(this.turns.slice(-KEEP_TURNS)));
    } catch {
      // the conversation still lives in the page
    }
  }

  showError(message) {
    errorBox.hidden = !message;
    errorBox.textContent = message ?? "";
  }

  render(turn) {
    const li = document.createElement("li");
    li.className = `turn ${turn.role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = turn.role === "user" ? "You" : "Model";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = turn.text;
    li.append(who, body);
    log.append(li);
    if (turn.meta) this.renderMeta(li, turn.meta);
    log.scrollTop = log.scrollHeight;
    return li;
  }

  renderMeta(li, meta) {
    li.querySelector(".meta")?.remove();
    li.classList.toggle("streaming", Boolean(meta.streaming));
    if (meta.streaming) return;
    const p = document.createElement("p");
    p.className = "meta";
    if (meta.stopped) p.textContent = "Stopped.";
    else if (meta.failed) p.textContent = `Failed: ${meta.failed}`;
    else p.textContent = meta.line;
    li.classList.toggle("stopped", Boolean(meta.stopped));
    li.classList.toggle("failed", Boolean(meta.failed));
    li.append(p);
  }
}

function summarize(done, dropped, routing) {
  const u = done.usage ?? {};
  const parts = [`${u.completion_tokens} tokens`, `ended by ${done.finish_reason}`, done.version];
  if (done.active_specialists?.length) {
    const w = done.active_weights;
    parts.push(`leaned on ${done.active_specialists.map((n) => `${n} ${w[n].toFixed(2)}`).join(", ")}`);
  }
  if (routing.force.length) parts.push(`forced ${routing.force.join(", ")}`);
  if (routing.exclude.length) parts.push(`excluded ${routing.exclude.join(", ")}`);
  if (dropped) parts.push(`${dropped} older part${dropped > 1 ? "s" : ""} left out to fit the context`);
  if (u.truncated_prompt_tokens) parts.push(`${u.truncated_prompt_tokens} prompt tokens cut to fit`);
  return { line: parts.join(" · ") };
}

function explain(err) {
  if (err instanceof ApiError) {
    const message = err.message.charAt(0).toUpperCase() + err.message.slice(1);
    if (err.status === 503) return `${message}. Try again once the status bar says it serves.`;
    if (err.status === 429) return `${message}. The server is busy; try again in a moment.`;
    return message;
  }
  if (err instanceof TypeError) return `The gateway could not be reached (${err.message}).`;
  return `The gateway's answer could not be read (${err.message}).`;
}

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}
