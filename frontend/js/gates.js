// The gate picture: for the last reply, one stacked bar per layer showing how much weight the
// gate gave the base attention and each specialist (mean over the reply's positions), drawn as
// plain SVG. And the routing control: force or exclude experts for the next message.

import { api } from "./api.js";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const chart = $("gates");
const caption = $("gates-caption");
const controls = $("routing");
const note = $("routing-note");
const CAPTION = caption.textContent;
const PALETTE = ["#64748b", "#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d"];
const COLORS_KEY = "sma-expert-colors";

// Each expert keeps its colour for good: the first time the page sees a name it takes the first
// colour no expert it knows has (the base always has the first), and the browser remembers it,
// so an add, a delete or a reload never repaints the others.
function remembered() {
  try {
    const stored = JSON.parse(localStorage.getItem(COLORS_KEY) || "{}");
    return stored && typeof stored === "object" ? stored : {};
  } catch {
    return {};
  }
}

export class Gates {
  constructor() {
    this.experts = [];
    this.colors = remembered();
    this.shown = 0; // replies asked about: an older answer arriving late is dropped
  }

  color(expert) {
    if (!PALETTE.includes(this.colors[expert])) {
      const taken = new Set(Object.values(this.colors));
      const free = PALETTE.slice(1).filter((c) => !taken.has(c));
      const known = Object.keys(this.colors).length;
      this.colors[expert] = expert === "general" ? PALETTE[0] : free[0] ?? PALETTE[1 + (known % (PALETTE.length - 1))];
      try {
        localStorage.setItem(COLORS_KEY, JSON.stringify(this.colors));
      } catch {
        // storage refused (private mode): the colours hold for this page only
      }
    }
    return this.colors[expert];
  }

  // The experts the model serves: "general" (the base) plus the ready specialists.
  setExperts(specialists) {
    const experts = ["general", ...specialists];
    if (experts.join() === this.experts.join()) return;
    const kept = this.choices();
    this.experts = experts;
    controls.replaceChildren(
      ...experts.map((expert) => {
        const label = document.createElement("label");
        label.className = "route";
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = this.color(expert);
        const select = document.createElement("select");
        select.dataset.expert = expert;
        select.setAttribute("aria-label", `Routing for ${expert}`);
        for (const [value, text] of [["auto", "gate decides"], ["force", "only"], ["exclude", "never"]]) {
          select.add(new Option(text, value));
        }
        select.value = kept[expert] ?? "auto";
        select.addEventListener("change", () => this.describe());
        label.append(swatch, `${expert === "general" ? "general (base)" : expert} `, select);
        return label;
      }),
    );
    this.describe();
  }

  choices() {
    const out = {};
    for (const select of controls.querySelectorAll("select")) out[select.dataset.expert] = select.value;
    return out;
  }

  describe() {
    const c = Object.entries(this.choices());
    const force = c.filter(([, v]) => v === "force").map(([e]) => e);
    const exclude = c.filter(([, v]) => v === "exclude").map(([e]) => e);
    const parts = [];
    if (force.length) parts.push(`only ${force.join(", ")}`);
    if (exclude.length) parts.push(`never ${exclude.join(", ")}`);
    note.textContent = parts.length ? `Next message: ${parts.join("; ")}` : "";
  }

  // The routing for the message being sent; the control then goes back to "gate decides".
  takeRouting() {
    const c = Object.entries(this.choices());
    const routing = {
      force: c.filter(([, v]) => v === "force").map(([e]) => e),
      exclude: c.filter(([, v]) => v === "exclude").map(([e]) => e),
    };
    for (const select of controls.querySelectorAll("select")) select.value = "auto";
    this.describe();
    return routing;
  }

  // Puts back a routing that was never used (the message failed before any token).
  restoreRouting({ force, exclude }) {
    for (const select of controls.querySelectorAll("select")) {
      const expert = select.dataset.expert;
      select.value = force.includes(expert) ? "force" : exclude.includes(expert) ? "exclude" : "auto";
    }
    this.describe();
  }

  clear() {
    this.shown += 1;
    chart.replaceChildren();
    caption.textContent = CAPTION;
  }

  // Per-layer gate weights over the reply's own positions, asked of the server for the full text.
  async showReply({ prompt, completion, done, routing }) {
    const n = done.usage?.completion_tokens ?? 0;
    if (!n) return;
    const ticket = ++this.shown;
    try {
      const g = await api("/inspect_gates", {
        method: "POST",
        body: { prompt: prompt + completion, routing: { force: routing.force, exclude: routing.exclude }, per_position: true },
      });
      if (ticket !== this.shown) return;
      const rows = g.layers.map((layer) => {
        const positions = layer.per_position.slice(-n);
        return g.experts.map((_, e) => positions.reduce((s, w) => s + w[e], 0) / positions.length);
      });
      this.draw(g.experts, rows);
      caption.textContent = `Mean gate weight per layer over the last reply (${n} tokens, ${g.version}).`;
    } catch (err) {
      if (ticket === this.shown) caption.textContent = `Could not read the gate weights: ${err.message}`;
    }
  }

  draw(experts, rows) {
    const width = 320;
    const label = 56;
    const rowHeight = 22;
    const gap = 6;
    const height = rows.length * (rowHeight + gap);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("role", "img");
    svg.setAttribute(
      "aria-label",
      rows
        .map((r, i) => `Layer ${i + 1}: ${experts.map((e, j) => `${e} ${r[j].toFixed(2)}`).join(", ")}`)
        .join(". "),
    );
    rows.forEach((weights, i) => {
      const y = i * (rowHeight + gap);
      const row = el("g", { class: "layer", "data-layer": i });
      const text = el("text", { x: 0, y: y + rowHeight / 2 + 4, class: "axis" });
      text.textContent = `layer ${i + 1}`;
      row.append(text);
      let x = label;
      const total = weights.reduce((a, b) => a + b, 0) || 1;
      weights.forEach((w, j) => {
        const span = ((width - label) * w) / total;
        if (span <= 0) return;
        const rect = el("rect", { x, y, width: span, height: rowHeight, fill: this.color(experts[j]) });
        const tip = el("title", {});
        tip.textContent = `layer ${i + 1}, ${experts[j]}: ${w.toFixed(3)}`;
        rect.append(tip);
        row.append(rect);
        if (span > 34) {
          const value = el("text", { x: x + span / 2, y: y + rowHeight / 2 + 4, class: "value" });
          value.textContent = w.toFixed(2);
          row.append(value);
        }
        x += span;
      });
      svg.append(row);
    });
    const legend = document.createElement("ul");
    legend.className = "legend";
    for (const expert of experts) {
      const li = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = this.color(expert);
      li.append(swatch, expert);
      legend.append(li);
    }
    chart.replaceChildren(svg, legend);
  }
}

function el(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}
