// The specialists panel: the registry's list with states, add and delete, and a progress bar for
// every unfinished operation, fed by its SSE stream. The list refreshes when an operation ends.

import { announce, api, events } from "./api.js";

const $ = (id) => document.getElementById(id);
const list = $("specialists");
const operations = $("operations");
const addForm = $("add-form");
const addName = $("add-name");
const addButton = $("add-button");
const addError = $("add-error");
const listError = $("list-error");
const dialog = $("confirm");

const TITLES = {
  initialize: () => "First start: training the model",
  add_specialist: (op) => `Adding ${op.target}`,
  delete_specialist: (op) => `Deleting ${op.target}`,
};
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

export class Specialists {
  constructor({ onChange }) {
    this.onChange = onChange;
    this.items = [];
    this.followed = new Map(); // operation id -> its element
    this.busy = false; // an operation is unfinished: the server takes one at a time
    this.asked = 0; // refreshes asked for: a late answer to an older one is dropped
    this.drawn = ""; // what the list shows, so an unchanged answer leaves focus alone
    addForm.addEventListener("submit", (e) => {
      e.preventDefault();
      this.add(addName.value.trim());
    });
  }

  async refresh() {
    const ticket = ++this.asked;
    let items, unfinished;
    try {
      [items, unfinished] = await Promise.all([
        api("/v1/specialists"),
        api("/operations?unfinished=true"),
      ]);
    } catch {
      return; // the status bar says the gateway is away
    }
    if (ticket !== this.asked) return;
    for (const op of unfinished) this.follow(op);
    this.busy = unfinished.length > 0;
    this.items = items;
    this.render();
  }

  render() {
    const ready = this.items.filter((s) => s.state === "ready");
    addButton.disabled = this.busy;
    this.onChange(ready.map((s) => s.name));
    const drawn = JSON.stringify([this.items, this.busy]);
    if (drawn === this.drawn) return; // rebuilding would take the focus from a button
    this.drawn = drawn;
    list.replaceChildren(...this.items.map((s) => this.row(s, ready.length)));
    if (!this.items.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "None serving yet.";
      list.append(li);
    }
  }

  row(s, readyCount) {
    const li = document.createElement("li");
    li.className = `specialist ${s.state}`;
    li.dataset.name = s.name;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = s.name;
    const state = document.createElement("span");
    state.className = "badge";
    state.textContent = s.state;
    li.append(name, state);
    if (s.state === "failed") {
      // Not served, so nothing to delete: the fix is new text in data/<name>/, then a retry.
      const retry = document.createElement("button");
      retry.type = "button";
      retry.className = "ghost";
      retry.textContent = "Retry";
      retry.setAttribute("aria-label", `Retry specialist ${s.name}`);
      retry.disabled = this.busy;
      retry.addEventListener("click", () => this.add(s.name));
      const why = document.createElement("p");
      why.className = "error small";
      why.textContent = s.error ?? "Training failed.";
      li.append(retry, why);
      return li;
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "ghost danger-text";
    remove.textContent = "Delete";
    remove.setAttribute("aria-label", `Delete specialist ${s.name}`);
    const last = s.state === "ready" && readyCount <= 1;
    remove.disabled = last || this.busy || s.state === "deleting";
    if (last) remove.title = "The model keeps at least one specialist";
    else if (this.busy) remove.title = "Another operation is running";
    remove.addEventListener("click", () => this.remove(s.name));
    li.append(remove);
    return li;
  }

  // `extra`: more of the request's body, such as the drift limit of an add made anyway.
  async add(name, extra = {}) {
    this.showAddError(null);
    if (!name) {
      this.showAddError("Type the name of a folder under data/.");
      return;
    }
    addButton.disabled = true;
    try {
      const op = await api("/specialists?wait=false", {
        method: "POST",
        body: { name, ...extra },
      });
      addName.value = "";
      this.follow(op);
      if (op.corpus) this.showCorpus(this.followed.get(op.id), op.corpus);
    } catch (err) {
      this.showAddError(err.message);
    }
    await this.refresh();
  }

  // `maxDrift`: the drift limit of a delete made anyway, which the user has confirmed once.
  async remove(name, maxDrift = null) {
    if (maxDrift == null && !(await confirmDelete(name))) return;
    this.showListError(null);
    const limit = maxDrift == null ? "" : `&max_drift=${maxDrift}`;
    try {
      const op = await api(`/specialists/${encodeURIComponent(name)}?wait=false${limit}`, {
        method: "DELETE",
      });
      this.follow(op);
    } catch (err) {
      this.showListError(err.message);
    }
    await this.refresh();
  }

  showAddError(message) {
    addError.hidden = !message;
    addError.textContent = message ?? "";
  }

  showListError(message) {
    listError.hidden = !message;
    listError.textContent = message ?? "";
  }

  // One progress row per operation, kept up to date by its event stream until it ends.
  follow(op) {
    if (this.followed.has(op.id)) return;
    const el = document.createElement("div");
    el.className = "operation";
    el.dataset.op = op.id;
    el.innerHTML = `<p class="op-title"></p><progress max="100"></progress><p class="op-detail note"></p>`;
    if (op.kind === "add_specialist") el.append(this.cancelButton(op, el));
    operations.append(el);
    this.followed.set(op.id, el);
    this.show(el, op);
    this.stream(op, el);
  }

  async stream(op, el) {
    let last = op;
    try {
      for await (const { event, data } of events(`/operations/${encodeURIComponent(op.id)}/events`)) {
        if (event !== "operation") break;
        last = data;
        this.show(el, data);
      }
    } catch {
      // the gateway went away mid-stream: the next refresh picks the operation up again
    }
    if (!FINISHED.has(last.state)) {
      this.followed.delete(op.id);
      el.remove();
      return;
    }
    const title = titleOf(last);
    if (last.state === "succeeded" && last.kind !== "initialize" && last.version) {
      await this.showOutcome(el, last);
      announce(`${title}: done. ${el.querySelector(".op-detail").textContent}`);
    } else if (last.state === "succeeded" || last.state === "cancelled") {
      el.remove();
      announce(`${title}: ${last.state === "succeeded" ? "done" : "cancelled"}.`);
    } else {
      this.showFailure(el, last);
      announce(`${title}: ${last.state}. ${last.error ?? ""}`);
    }
    await this.refresh();
  }

  show(el, op) {
    const p = op.progress;
    const title = titleOf(op);
    el.querySelector(".op-title").textContent = `${title} — ${op.state}`;
    const bar = el.querySelector("progress");
    bar.value = p.percent;
    bar.setAttribute("aria-label", `${title}: ${p.percent.toFixed(0)}%`);
    const detail = [`${p.percent.toFixed(0)}%`];
    if (p.phase) detail.unshift(phaseName(p.phase));
    const training = op.state === "running" && p.step > 0;
    if (training && p.loss != null) detail.push(`loss ${p.loss.toFixed(3)}`);
    if (training && p.eta_s >= 1) detail.push(`ETA ${duration(p.eta_s)}`);
    if (op.message && op.state === "running" && p.percent >= 100) detail.push(op.message);
    el.querySelector(".op-detail").textContent = detail.join(" · ");
    if (op.version || FINISHED.has(op.state)) el.querySelector(".op-cancel")?.remove(); // trained
  }

  // An add can be stopped while it trains; the server says when it is too late.
  cancelButton(op, el) {
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "ghost op-cancel";
    cancel.textContent = "Cancel";
    cancel.setAttribute("aria-label", `Cancel ${titleOf(op)}`);
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api(`/operations/${encodeURIComponent(op.id)}/cancel`, { method: "POST" });
      } catch (err) {
        el.querySelector(".op-detail").textContent = err.message;
      }
    });
    return cancel;
  }

  // What the add read: files, documents, tokens and the share held out for evaluation.
  showCorpus(el, corpus) {
    if (!el) return;
    const p = document.createElement("p");
    p.className = "op-corpus note";
    const parts = [
      `${count(corpus.files)} file${corpus.files === 1 ? "" : "s"}`,
      `${count(corpus.documents)} documents`,
    ];
    if (corpus.tokens) parts.push(`${corpus.tokens_estimated ? "about " : ""}${count(corpus.tokens)} tokens to train on`);
    if (corpus.heldout_share != null) {
      parts.push(`${(100 * corpus.heldout_share).toFixed(0)}% held out (${count(corpus.heldout_documents)} documents)`);
    }
    p.textContent = `Read ${parts.join(", ")}.`;
    el.querySelector(".op-title").after(p);
  }

  // After an add or delete: the new version, the added specialist's gain on its own text and
  // routing share, and how every other domain moved; it stays until dismissed.
  async showOutcome(el, op) {
    el.querySelector(".op-cancel")?.remove();
    el.querySelector("progress")?.remove();
    el.classList.add("outcome");
    el.querySelector(".op-title").textContent = `${titleOf(op)}: done, ${op.version} serves`;
    let version;
    try {
      version = (await api("/versions")).find((v) => v.id === op.version);
    } catch {
      version = null;
    }
    const changes = version?.metrics?.changes ?? {};
    const lines = [];
    const own = changes[op.target];
    if (op.kind === "add_specialist" && own) {
      const routing = version.metrics.domains?.[op.target]?.routing;
      lines.push(
        `${op.target}: perplexity ${own.before.toFixed(1)} → ${own.after.toFixed(1)} (${percent(own.change)})` +
          (routing != null ? `, ${(100 * routing).toFixed(0)}% of its documents routed to it` : ""),
      );
    }
    const others = Object.entries(changes).filter(([name]) => name !== op.target);
    if (others.length) {
      lines.push(`Others: ${others.map(([name, c]) => `${name} ${percent(c.change)}`).join(", ")}`);
    }
    el.querySelector(".op-detail").textContent = lines.join(". ") || (op.message ?? "");
    this.dismissButton(el);
  }

  showFailure(el, op) {
    el.querySelector(".op-cancel")?.remove();
    el.classList.add("failed");
    el.querySelector("progress")?.remove();
    el.querySelector(".op-detail").textContent = op.error ?? "It did not finish.";
    const again = ANYWAY[op.kind];
    if (again && /higher max_drift/.test(op.error ?? "")) {
      // the user decides: the same add or delete, published whatever it does to the others
      const anyway = document.createElement("button");
      anyway.type = "button";
      anyway.className = "ghost";
      anyway.textContent = `${again.verb} anyway`;
      anyway.setAttribute("aria-label", `${again.verb} ${op.target} anyway`);
      anyway.addEventListener("click", () => {
        el.remove();
        again.run(this, op.target);
      });
      el.append(anyway);
    }
    this.dismissButton(el);
  }

  dismissButton(el) {
    const dismiss = document.createElement("button");
    dismiss.type = "button";
    dismiss.className = "ghost";
    dismiss.textContent = "Dismiss";
    dismiss.addEventListener("click", () => el.remove());
    el.append(dismiss);
  }
}

const ANYWAY_DRIFT = 1000; // percent: the largest limit the API takes

// What a failed operation's "anyway" button does, by the operation's kind.
const ANYWAY = {
  add_specialist: { verb: "Add", run: (list, name) => list.add(name, { max_drift: ANYWAY_DRIFT }) },
  delete_specialist: { verb: "Delete", run: (list, name) => list.remove(name, ANYWAY_DRIFT) },
};

function count(n) {
  return Number(n).toLocaleString("en-US");
}

function percent(change) {
  const p = 100 * change;
  return `${p >= 0 ? "+" : "−"}${Math.abs(p).toFixed(Math.abs(p) < 10 ? 2 : 0)}%`;
}

function titleOf(op) {
  return TITLES[op.kind]?.(op) ?? op.kind;
}

function confirmDelete(name) {
  $("confirm-text").textContent =
    `The model is retrained without ${name}; its corpus moves to data/.deleted/ and is kept.`;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// The training service's phase names, in the user's words.
function phaseName(phase) {
  if (phase.startsWith("specialist:")) return `training ${phase.slice(11)}`;
  return PHASES[phase] ?? phase;
}
const PHASES = {
  "demo corpus": "building the demo corpus",
  tokenizer: "training the tokenizer",
  generalist: "training the generalist",
  gate: "training the gate",
};

function duration(seconds) {
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m}m ${s % 60}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
}
