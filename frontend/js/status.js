// The status bar: serving version, device, and first-start progress, from GET /health.

import { announce, api } from "./api.js";

const text = document.getElementById("status-text");
const bar = document.getElementById("status-progress");

export function describeHealth(health) {
  if (!health) return "The gateway does not answer; retrying…";
  if (!health.initialized) {
    const first = health.first_start;
    if (first) {
      const p = first.progress;
      return `First start: training the model (${p.phase || "starting"}, ${p.percent.toFixed(0)}%)`;
    }
    return health.boot ? `Not serving: ${health.boot}` : "No model is serving yet";
  }
  const parts = [`Serving ${health.loaded_version}`];
  if (health.device) parts.push(health.device);
  if (health.profile) parts.push(`${health.profile} profile`);
  if (health.serving_version && health.serving_version !== health.loaded_version) {
    parts.push(`loading ${health.serving_version}`);
  }
  const down = Object.entries(health.services ?? {}).filter(([, s]) => s.status !== "SERVING");
  if (down.length) parts.push(`degraded: ${down.map(([n]) => n).join(", ")} down`);
  // the generalist serves while a first start trains the specialists
  const first = health.first_start;
  if (first) {
    const p = first.progress;
    parts.push(`first start: ${p.phase || "starting"}, ${p.percent.toFixed(0)}%`);
  } else if (!down.length) {
    parts.push("ready");
  }
  return parts.join(" · ");
}

let said = null;

export function renderStatus(health) {
  text.textContent = describeHealth(health);
  const state = !health ? "offline" : health.initialized ? "serving" : "training";
  document.body.dataset.state = state;
  // Only a change of state is announced, not every percent of a first start.
  const news = state === "serving" ? `Serving ${health.loaded_version}` : state;
  if (news !== said) {
    if (said !== null) announce(text.textContent);
    said = news;
  }
  const first = health?.first_start;
  bar.hidden = !first;
  if (first) bar.value = first.progress.percent;
}

// Calls `onHealth(health | null)` now and then every few seconds (faster during a first start).
export function watchHealth(onHealth) {
  let last = null;
  async function tick() {
    try {
      last = await api("/health");
    } catch {
      last = null;
    }
    try {
      onHealth(last);
    } finally {
      setTimeout(tick, last?.initialized && !last?.first_start ? 3000 : 1000);
    }
  }
  tick();
}
