// Wires the panels together: health drives the status bar, the chat's context and the
// specialists list; the specialists list drives the routing control; a reply draws the gate.

import { Chat } from "./chat.js";
import { Gates } from "./gates.js";
import { Specialists } from "./specialists.js";
import { renderStatus, watchHealth } from "./status.js";

const gates = new Gates();
const specialists = new Specialists({ onChange: (names) => gates.setExperts(names) });
const chat = new Chat({
  takeRouting: () => gates.takeRouting(),
  restoreRouting: (routing) => gates.restoreRouting(routing),
  onReply: (reply) => gates.showReply(reply),
  onClear: () => gates.clear(),
});

watchHealth((health) => {
  renderStatus(health);
  if (health?.model?.context) chat.setContext(health.model.context);
  if (health?.model) chat.setChatTemplate(health.model.chat_template);
  if (health) specialists.refresh();
});
