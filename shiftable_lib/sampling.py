"""What a generation request may ask for: sampling parameters and routing, their defaults and
their bounds.

One contract for every way in: `sma generate`, the REST gateway and the gRPC `Generate` take
their defaults from here, and `SamplingParams.validate` is the one check of their ranges (the
gateway's request schema reuses the same bounds so that a bad body fails before it travels).
Torch-free, so that the gateway can import it without a model library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shiftable_lib.errors import NotFound

# how a chat becomes a prompt for a model trained from scratch to continue text: the messages'
# texts, a blank line apart, and the model continues the last (a Jinja template, as Hugging
# Face tokenizers carry one; a version records its own in config.json's "chat_template")
# The blank line is an expression: chat templates render with trim_blocks (as Hugging Face's
# do), which would take the first newline after a `{% endif %}` away.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['content'] }}{{ '\\n\\n' if not loop.last else '' }}"
    "{%- endfor -%}"
)
# what versions written before recorded: it rendered the messages a single newline apart
_PLAIN_BEFORE = (
    "{%- for message in messages -%}"
    "{{ message['content'] }}{% if not loop.last %}\n\n{% endif %}"
    "{%- endfor -%}"
)


def chat_template_of(recorded: str | None) -> str:
    """The template a version renders chats with: the one it records, else (none, or the
    plain one as earlier versions wrote it) the plain one."""
    return PLAIN_CHAT_TEMPLATE if recorded in (None, "", _PLAIN_BEFORE) else recorded


def is_plain(template: str) -> bool:
    return chat_template_of(template) == PLAIN_CHAT_TEMPLATE


DEFAULT_MAX_NEW_TOKENS = 64  # or half the context, if smaller: the prompt keeps the rest
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 0  # the whole vocabulary
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K_EXPERTS = 2  # experts per position for `topk` routing

MAX_NEW_TOKENS = 100_000  # what a request may ask for at all; the model's context bounds it too
# a prompt's length in characters: far past any context (it is left-truncated to fit), and
# short enough that tokenizing it never holds the decode loop up for long
MAX_PROMPT_CHARS = 100_000
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # one stop string's length
MAX_NAME_CHARS = 64  # an expert's name (a specialist name, or "general")
MAX_TOP_K_EXPERTS = 64
MAX_ROUTING_NAMES = 64  # names in `force` or `exclude`
MAX_LOGPROBS = 20  # most likely alternatives reported per token (OpenAI's top_logprobs bound)

ROUTING_MODES = ("soft", "top1", "topk")


def default_max_new_tokens(context: int) -> int:
    """The completion length a request gets when it names none."""
    return min(DEFAULT_MAX_NEW_TOKENS, context // 2)


@dataclass(frozen=True)
class Routing:
    """How one sequence may use the experts.

    mode: `soft` mixes all allowed experts; `top1`/`topk` keep the k highest-gated per position
    and renormalise. force: only these experts are allowed. exclude: these are not.
    """

    mode: str = "soft"
    k: int = DEFAULT_TOP_K_EXPERTS
    force: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def top_k(self) -> int:
        return {"soft": 0, "top1": 1}.get(self.mode, self.k)

    def allowed(self, experts: tuple[str, ...]) -> list[bool]:
        """Which experts this routing admits; raises if it names unknown ones or admits none."""
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {self.mode!r}: use one of {ROUTING_MODES}")
        if self.mode == "topk" and not 1 <= self.k <= MAX_TOP_K_EXPERTS:
            raise ValueError(f"topk routing needs k between 1 and {MAX_TOP_K_EXPERTS}")
        for name in (*self.force, *self.exclude):
            if name not in experts:
                shown = name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS] + "..."
                raise NotFound(f"no expert named {shown!r}; the model has {', '.join(experts)}")
        ok = [(not self.force or e in self.force) and e not in self.exclude for e in experts]
        if not any(ok):
            raise ValueError("this routing excludes every expert; leave at least one")
        return ok


SOFT = Routing()


def validate_prompt(prompt: str) -> str:
    """`prompt`, or ValueError if it is longer than any request may be."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    return prompt


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_k: int = DEFAULT_TOP_K  # 0 = whole vocabulary
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    stop: tuple[str, ...] = ()
    routing: Routing = SOFT
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    # the log-probability of each generated token under the model (its raw distribution, before
    # temperature, top-k and top-p) with this many most likely alternatives; None: none
    logprobs: int | None = None
    # also score the prompt: each prompt token's log-probability given the tokens before it
    # (with `logprobs` alternatives); with it, max_new_tokens may be 0 (score only)
    prompt_logprobs: bool = False
    # a prompt that does not fit the context with max_new_tokens loses its first tokens; with
    # False it is refused instead (what the OpenAI API does)
    truncate: bool = True

    def validate(self, context: int) -> None:
        """Raise ValueError with a sentence a user can act on if any field is out of range."""
        least = 0 if self.prompt_logprobs else 1
        if not least <= self.max_new_tokens < context:
            raise ValueError(
                f"max_new_tokens must be between {least} and {context - 1} (the context)"
                + ("; 0 only when the prompt is scored" if least else "")
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE:g} (0 = greedy)")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 0 and {MAX_TOP_K} (0 means no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters")
