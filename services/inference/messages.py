"""What `InferenceCore` and its worker process say to each other, and the values both share.

Each message is one small frozen dataclass that crosses a `multiprocessing` pipe, so all of
them pickle. The core sends commands (`Submit`, `Cancel`, `Load`, `Inspect`, `Shutdown`); the
worker answers with events (`Chunks`, `StreamFailed`, `Loaded`, `Inspected`, `CallFailed`).

The per-token path is `Chunks`: the worker sends one per decode step, carrying every stream's
chunk of that step and its load counters, so a step costs one pickle and one pipe write
however many streams it advanced. The chunks travel as plain `(stream_id, chunk)` pairs, not
as one message object each, because every extra object per token is paid on both sides of
the pipe. The other events are rare and go one per pipe message, in the order they happen.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from shiftable_lib.generate import Logprob
from shiftable_lib.model import ModelConfig
from shiftable_lib.sampling import Routing, SamplingParams

# ---- values both sides share -------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # after left-truncation
    completion_tokens: int
    truncated_prompt_tokens: int  # dropped from the left to fit the context


@dataclass(frozen=True)
class Chunk:
    """What one or more decode steps added to a completion.

    The last chunk of a stream has `finish_reason` ("length", "stop", "eos" or "cancelled"),
    `usage` and `gate_means` (mean gate weight per expert over the completion and every layer).
    """

    text: str  # may be empty while a character or a possible stop string is held back
    token_ids: tuple[int, ...]
    version_id: str
    finish_reason: str | None = None
    usage: Usage | None = None
    gate_means: dict[str, float] | None = None
    logprobs: tuple[Logprob, ...] = ()  # one per token id, when the request asks for them
    # the first chunk's, when the request scores its prompt: per prompt token (as the model
    # read it), its log-probability given the ones before it (None for the first)
    prompt: tuple[int, ...] = ()
    prompt_logprobs: tuple[Logprob | None, ...] = ()


@dataclass(frozen=True)
class GateReport:
    """The gate's weights for one prompt: per layer, per position (token), per expert."""

    version_id: str
    experts: tuple[str, ...]  # "general" first, then the specialists
    tokens: list[str]
    means: list[list[float]]  # (layers, experts): mean over positions
    per_position: list[list[list[float]]]  # (layers, positions, experts)
    truncated_prompt_tokens: int


@dataclass(frozen=True)
class Info:
    """The loaded model (empty fields before one is) and the server's load."""

    version_id: str
    specialists: tuple[str, ...]
    device: str
    profile: str
    context: int
    n_layer: int
    d_model: int
    vocab_size: int
    max_batch: int
    max_queue: int
    active_streams: int  # sequences holding a decode slot
    queued: int  # accepted, waiting for a slot
    tokens_generated: int
    requests_total: int
    steps: int  # decode steps run; tokens_generated / steps is the mean batch
    decode_seconds: float  # wall time spent in those steps; / steps is the mean step time
    swapping: bool
    load_error: str
    eos_token: str = ""
    chat_template: str = ""
    dtype: str = ""
    threads: int = 0


@dataclass(frozen=True)
class LoadedVersion:
    """What the server process knows of a loaded version (the weights live in the worker)."""

    id: str
    cfg: ModelConfig
    profile: str
    tokenizer: Tokenizer  # for /tokenize and the text of tokens, on the server's side
    chat_template: str
    stop_tokens: tuple[str, ...] = ()  # () = our EOS
    dtype: str = ""  # the weights' dtype as served: float32, bfloat16
    threads: int = 0  # the CPU threads its decode runs on; 0 on a GPU


@dataclass(frozen=True)
class Stats:
    """The worker's load counters; tokens, steps and seconds count from the worker's start."""

    active: int
    queued: int
    tokens: int
    steps: int
    seconds: float = 0.0  # in decode steps


IDLE = Stats(0, 0, 0, 0)


# ---- core -> worker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    """Start a stream; the worker answers with `Chunks` for it, or one `StreamFailed`."""

    stream_id: int
    prompt: str | list[int]  # text, or token ids
    params: SamplingParams


@dataclass(frozen=True)
class Cancel:
    """Stop a stream at once and free its slot; nothing more is sent for it."""

    stream_id: int


@dataclass(frozen=True)
class Load:
    """Load a version and serve new streams from it; answered by `Loaded` or `CallFailed`."""

    call_id: int
    version_id: str


@dataclass(frozen=True)
class Inspect:
    """Run the gate over one prompt; answered by `Inspected` or `CallFailed`."""

    call_id: int
    prompt: str
    routing: Routing


@dataclass(frozen=True)
class Shutdown:
    """End every stream as cancelled, send their last `Chunks`, then exit."""


Command = Submit | Cancel | Load | Inspect | Shutdown


# ---- worker -> core ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunks:
    """One decode step's output (or a stream's last chunk at shutdown), with the counters after
    it. `chunks` is empty when only the counters changed."""

    chunks: list[tuple[int, Chunk]]  # (stream id, chunk); the last of a stream ends it
    stats: Stats


@dataclass(frozen=True)
class StreamFailed:
    """A stream ended with an error (refused at submission, or its decode step failed)."""

    stream_id: int
    error: Exception


@dataclass(frozen=True)
class Loaded:
    call_id: int
    version: LoadedVersion


@dataclass(frozen=True)
class Inspected:
    call_id: int
    report: GateReport


@dataclass(frozen=True)
class CallFailed:
    """A `Load` or `Inspect` failed; `error` is what the caller sees."""

    call_id: int
    error: Exception


Event = Chunks | StreamFailed | Loaded | Inspected | CallFailed
