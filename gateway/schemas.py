"""REST bodies (pydantic) and their translation to and from the gRPC messages.

The original API's four request fields keep their names and meaning; everything else is an optional
extra with a default, so the original proof of concept's page and scripts keep working unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shiftable_lib.config import MAX_DRIFT
from shiftable_lib.sampling import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_K_EXPERTS,
    DEFAULT_TOP_P,
    MAX_NAME_CHARS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_ROUTING_NAMES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MAX_TOP_K_EXPERTS,
)
from sma.v1 import common_pb2, inference_pb2, registry_pb2, training_pb2

# the smallest positive float32: the wire's `top_p` is a float32, in which a smaller top_p the
# schema admits (> 0) would arrive as 0 and be refused; it samples the same (the top token)
FLOAT32_TINY = math.ldexp(1.0, -149)

ExpertName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class RoutingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["soft", "top1", "topk"] = "soft"
    k: int = Field(
        default=DEFAULT_TOP_K_EXPERTS,
        ge=1,
        le=MAX_TOP_K_EXPERTS,
        description="experts per position for topk",
    )
    force: list[ExpertName] = Field(
        default_factory=list, max_length=MAX_ROUTING_NAMES, description="only these"
    )
    exclude: list[ExpertName] = Field(
        default_factory=list, max_length=MAX_ROUTING_NAMES, description="never these"
    )

    def to_proto(self) -> inference_pb2.Routing:
        return inference_pb2.Routing(
            mode={
                "soft": inference_pb2.ROUTING_MODE_SOFT,
                "top1": inference_pb2.ROUTING_MODE_TOP1,
                "topk": inference_pb2.ROUTING_MODE_TOPK,
            }[self.mode],
            top_k_experts=self.k,
            force=self.force,
            exclude=self.exclude,
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


MAX_MESSAGES = 1024  # of a chat


class GenerateBody(BaseModel):
    """POST /generate and /generate/stream. `prompt` and the next three fields are the original
    API's; `messages` may take the prompt's place."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGES,
        description="instead of `prompt`: a chat, made a prompt by the serving model's chat "
        "template (an instruct model's own; the messages a blank line apart for ours), ready "
        "for the assistant's turn",
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_NEW_TOKENS,
        description=f"default: {DEFAULT_MAX_NEW_TOKENS}, or half the context if smaller",
    )
    temperature: float = Field(
        default=DEFAULT_TEMPERATURE, ge=0.0, le=MAX_TEMPERATURE, description="0 = greedy"
    )
    top_k: int = Field(
        default=DEFAULT_TOP_K, ge=0, le=MAX_TOP_K, description="0 = whole vocabulary"
    )
    top_p: float = Field(default=DEFAULT_TOP_P, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    routing: RoutingBody = Field(default_factory=RoutingBody)
    ignore_eos: bool = Field(default=False, description="exactly max_new_tokens (benchmarks)")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either `prompt` or `messages`")
        return self

    def to_proto(self, prompt: str | None = None) -> inference_pb2.GenerateRequest:
        """The request, for `prompt` (`messages` rendered), else the body's prompt."""
        request = inference_pb2.GenerateRequest(
            prompt=self.prompt if prompt is None else prompt,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=max(self.top_p, FLOAT32_TINY),
            stop=self.stop,
            routing=self.routing.to_proto(),
            ignore_eos=self.ignore_eos,
        )
        if self.seed is not None:
            request.seed = self.seed
        if self.max_new_tokens is not None:
            request.max_new_tokens = self.max_new_tokens
        return request


class InspectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    routing: RoutingBody = Field(default_factory=RoutingBody)
    per_position: bool = Field(default=False, description="also return every position's weights")


class SpecialistBody(BaseModel):
    """POST /specialists. `name` is the original API's; `full_retrain` retrains every specialist."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    full_retrain: bool = False
    max_drift: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_DRIFT,
        description="percent: publish only if no other domain's held-out perplexity gets worse "
        "than this; null = the training service's setting (SMA_MAX_DRIFT, 0.5)",
    )


ACTIVE_WEIGHT = 0.1  # a specialist with at least this mean gate weight counts as active


def gate_summary(gate_means: list[inference_pb2.ExpertWeight]) -> dict:
    """`active_weights` (mean gate weight of each specialist over the completion) and
    `active_specialists` (those at or above ACTIVE_WEIGHT, heaviest first)."""
    weights = {w.expert: round(w.weight, 4) for w in gate_means if w.expert != "general"}
    active = sorted((n for n in weights if weights[n] >= ACTIVE_WEIGHT), key=lambda n: -weights[n])
    base = next((w.weight for w in gate_means if w.expert == "general"), None)
    return {
        "active_specialists": active,
        "active_weights": weights,
        "base_weight": None if base is None else round(base, 4),
    }


FINISH = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_EOS: "eos",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


def usage(message: inference_pb2.Usage) -> dict:
    return {
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "truncated_prompt_tokens": message.truncated_prompt_tokens,
    }


def _time(ts: Timestamp) -> str | None:
    return ts.ToDatetime().isoformat() + "Z" if ts.seconds or ts.nanos else None


def enum_name(enum, value: int) -> str:
    """`OPERATION_STATE_RUNNING` -> `running`: the enum's prefix (from its zero) dropped."""
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    return enum.Name(value).removeprefix(prefix).lower()


def progress_dict(p: common_pb2.TrainingProgress) -> dict:
    return {
        "phase": p.phase,
        "step": p.step,
        "total": p.total,
        "fraction": round(p.fraction, 4),
        "percent": round(100 * p.fraction, 1),
        "loss": None if math.isnan(p.loss) else round(p.loss, 4),
        "tokens_per_s": round(p.tokens_per_s, 1),
        "eta_s": round(p.eta_s, 1),
    }


def operation_dict(op: registry_pb2.Operation) -> dict:
    """The operation object of the REST API: id, kind, state, progress, error, ..."""
    return {
        "id": op.id,
        "kind": enum_name(registry_pb2.OperationKind, op.kind),
        "target": op.target or None,
        "state": enum_name(registry_pb2.OperationState, op.state),
        "progress": progress_dict(op.progress),
        "error": op.error or None,
        "message": op.message or None,
        "job_id": op.job_id or None,
        "version": op.version_id or None,
        "full_retrain": op.full_retrain,
        "max_drift": op.max_drift if op.HasField("max_drift") else None,
        "cancel_requested": op.cancel_requested,
        "driven_by": op.owner or None,  # the gateway holding its lease while unfinished
        "created_at": _time(op.created_at),
        "updated_at": _time(op.updated_at),
    }


def corpus_dict(c: training_pb2.Corpus) -> dict:
    """A corpus as the training service read it: files, documents, tokens, the held-out share."""
    return {
        "dir": c.dir,
        "files": c.files,
        "bytes": c.bytes,
        "documents": c.documents,
        "heldout_documents": c.heldout_documents,
        "heldout_share": round(c.heldout_chars / c.chars, 4) if c.chars else None,
        "tokens": c.tokens or None,  # to train on; none before the first model
        "heldout_tokens": c.heldout_tokens or None,
        "tokens_estimated": c.estimated,
    }


def outcome_dict(v: common_pb2.ModelVersion, target: str) -> dict:
    """What an add or delete did, from the new version's metrics: the held-out perplexity of
    the specialist added (before: the model without it; its routing share), and of every other
    domain, before and after, with the limit it was published under."""
    try:
        metrics = json.loads(v.metrics_json) if v.metrics_json else {}
    except json.JSONDecodeError:
        metrics = {}
    changes = metrics.get("changes") or {}
    own = changes.get(target)
    routing = (metrics.get("domains") or {}).get(target, {}).get("routing")
    return {
        "version": v.id,
        "specialist": {**own, "routing": routing} if own else None,
        "others": {n: c for n, c in changes.items() if n != target},
        "max_drift": metrics.get("max_drift"),
    }


def specialist_dict(s: registry_pb2.Specialist) -> dict:
    return {
        "name": s.name,
        "state": enum_name(registry_pb2.SpecialistState, s.state),
        "error": s.error or None,
        "corpus_dir": s.corpus_dir,
        "corpus_digest": s.corpus_digest or None,
        "updated_at": _time(s.updated_at),
    }


# characters that end a line for str.splitlines (and so for many SSE readers, such as httpx's
# iter_lines) though not for SSE: escaped, so a token holding one cannot split its event
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(event: str, data: dict) -> str:
    """One Server-Sent Event."""
    text = json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)
    return f"event: {event}\ndata: {text}\n\n"


def version_dict(v, serving: bool) -> dict:
    """A model version of the REST API (`v` is the wire's ModelVersion)."""
    try:
        metrics = json.loads(v.metrics_json) if v.metrics_json else {}
    except json.JSONDecodeError:
        metrics = {}
    return {
        "id": v.id,
        "specialists": list(v.specialists),
        "profile": v.profile or None,
        "metrics": metrics,
        "created_at": _time(v.created_at),
        "serving": serving,
        "invalid_reason": v.invalid_reason or None,  # failed its check on loading
    }


def artifact_paths(artifact_dir: str) -> dict[str, str]:
    """The original API's /health path fields, pointing at our single-file version layout."""
    base = Path(artifact_dir)
    model = str(base / "model.safetensors") if artifact_dir else ""
    return {
        "tokenizer_path": str(base / "tokenizer.json") if artifact_dir else "",
        "generalist_ckpt_path": model,
        "shiftable_ckpt_path": model,
    }
