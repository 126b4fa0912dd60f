"""The OpenAI-compatible API's bodies, errors and replies, and their translation to `Generate`.

The model is `shiftable`; each specialist is also a model, `shiftable:<name>`, which forces
that specialist (as LoRAX and TGI take an adapter's name in `model`). Our routing controls
(`force`, `exclude`, `mode`, `k`) and `top_k` are accepted as extra body fields. A prompt that
does not fit the context with `max_tokens` is refused (400), as OpenAI and vLLM do, where the
original `/generate` drops its first tokens.
"""

from __future__ import annotations

import codecs
import functools
import secrets
import time
from typing import Annotated, Any, Literal

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

from gateway.schemas import MAX_MESSAGES, ChatMessage, RoutingBody
from shiftable_lib.sampling import (
    DEFAULT_TOP_K_EXPERTS,
    MAX_LOGPROBS,
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
from sma.v1 import inference_pb2

MODEL = "shiftable"
MAX_CHOICES = 16  # `n` times the prompts of one request: each is a stream of its own

# finish reasons as OpenAI names them: the end of text is a natural stop
FINISH = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_EOS: "stop",
    inference_pb2.FINISH_REASON_CANCELLED: "abort",
}


class OpenAIError(Exception):
    """A refusal in OpenAI's error shape (`{"error": {message, type, param, code}}`)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    if status == 401:
        kind = "authentication_error"
    elif status == 403:
        kind = "permission_error"
    elif status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- bodies --------------------------------------------------------------------------------------

Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; only false: usage comes once, at the end


class Common(BaseModel):
    """What both endpoints take: sampling, streaming, and our extras."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=2 * MAX_NAME_CHARS)
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop | list[Stop] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=256)
    # extras: sampling and routing as our own API names them
    top_k: int = Field(
        default=0, ge=-1, le=MAX_TOP_K, description="0 (or vLLM's -1) = the whole vocabulary"
    )
    ignore_eos: bool = False
    mode: Literal["soft", "top1", "topk"] = "soft"
    k: int = Field(default=DEFAULT_TOP_K_EXPERTS, ge=1, le=MAX_TOP_K_EXPERTS)
    force: list[Name] = Field(default_factory=list, max_length=MAX_ROUTING_NAMES)
    exclude: list[Name] = Field(default_factory=list, max_length=MAX_ROUTING_NAMES)

    def check_supported(self) -> None:
        """400 for what the API defines and this server does not do, rather than ignore it."""
        if self.presence_penalty or self.frequency_penalty:
            raise OpenAIError(400, "presence and frequency penalties are not supported", "penalty")
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed with stream", "stream_options")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise OpenAIError(
                400, "usage in every chunk is not supported: use include_usage", "stream_options"
            )
        stops = self.stops()
        if len(stops) > MAX_STOP_STRINGS:
            raise OpenAIError(400, f"at most {MAX_STOP_STRINGS} stop strings", "stop")

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def routing(self, specialists: list[str]) -> inference_pb2.Routing:
        """The routing `model` and the extras ask for; 404 for a model that is not served."""
        force = list(self.force)
        if self.model != MODEL:
            name = self.model.removeprefix(MODEL + ":")
            if self.model == name or name not in specialists:
                served = ", ".join([MODEL, *(f"{MODEL}:{s}" for s in specialists)])
                raise OpenAIError(
                    404,
                    f"the model {self.model!r} does not exist; served: {served}",
                    "model",
                    "model_not_found",
                )
            if force:
                raise OpenAIError(
                    400, "name the specialist in `model` or in `force`, not both", "force"
                )
            force = [name]
        return RoutingBody(mode=self.mode, k=self.k, force=force, exclude=self.exclude).to_proto()

    def request(
        self,
        prompt: str | list[int],
        max_tokens: int | None,
        specialists: list[str],
        logprobs: int | None,
        echo: bool,
        choice: int,
    ) -> inference_pb2.GenerateRequest:
        """The `Generate` request of one choice (`choice` shifts the seed, so that the `n`
        choices of a seeded request differ, and each is repeatable)."""
        request = inference_pb2.GenerateRequest(
            top_k=max(self.top_k, 0),
            stop=self.stops(),
            routing=self.routing(specialists),
            ignore_eos=self.ignore_eos,
            prompt_logprobs=echo and logprobs is not None,
            no_truncation=True,
        )
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.extend(prompt)
        if max_tokens is not None:
            request.max_new_tokens = max_tokens
        request.temperature = 1.0 if self.temperature is None else self.temperature
        if self.top_p is not None:
            request.top_p = self.top_p
        if self.seed is not None:
            request.seed = (self.seed + choice + 2**63) % 2**64 - 2**63
        if logprobs is not None:
            request.logprobs = logprobs
        return request


class CompletionBody(Common):
    """POST /v1/completions."""

    prompt: (
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
        | Annotated[
            list[Annotated[list[int], Field(min_length=1, max_length=MAX_PROMPT_CHARS)]],
            Field(min_length=1),
        ]
    )
    max_tokens: int | None = Field(default=16, ge=0, le=MAX_NEW_TOKENS, description="null = 16")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    def limit(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise OpenAIError(400, "best_of other than n is not supported", "best_of")
        if self.limit() == 0 and not (self.echo and self.logprobs is not None):
            raise OpenAIError(
                400,
                "max_tokens may be 0 only to score the prompt (echo and logprobs)",
                "max_tokens",
            )
        if len(self.prompts()) * (self.n or 1) > MAX_CHOICES:
            raise OpenAIError(400, f"at most {MAX_CHOICES} choices (prompts times n)", "n")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class ChatBody(Common):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise OpenAIError(400, "tools are not supported by this model", "tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", "top_logprobs")

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeBody(BaseModel):
    """POST /tokenize (vLLM's): a prompt, or chat messages as the chat template renders them."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True  # our tokenizers add none either way
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_PROMPT_CHARS)


# ---- chat template -------------------------------------------------------------------------------


def _raise(message: str) -> None:
    raise TemplateError(message)


# as Hugging Face renders chat templates: sandboxed, loop controls, `raise_exception`
_JINJA = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
)
_JINJA.globals["raise_exception"] = _raise


@functools.lru_cache(maxsize=8)
def _template(source: str) -> Template:
    return _JINJA.from_string(source)


def render_chat(
    template: str, messages: list[ChatMessage], eos_token: str, add_generation_prompt: bool = True
) -> str:
    """The prompt a chat becomes under the model version's template (Hugging Face's variables:
    `messages`, `add_generation_prompt`, `bos_token`, `eos_token`)."""
    try:
        return _template(template).render(
            messages=[
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in messages
            ],
            add_generation_prompt=add_generation_prompt,
            bos_token="",
            eos_token=eos_token,
        )
    except TemplateError as exc:
        raise OpenAIError(400, f"the chat template cannot render these messages: {exc}") from exc


# ---- replies -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def gate_weights(message: inference_pb2.GenerateResponse | None) -> dict[str, float] | None:
    """Mean gate weight of each expert (the base is `general`) over the completion: which
    specialists wrote it (an extra field of each choice)."""
    if message is None or not message.gate_means:
        return None
    return {w.expert: round(w.weight, 4) for w in message.gate_means}


def _value(entry: inference_pb2.TokenLogprob) -> float | None:
    return entry.logprob if entry.HasField("logprob") else None


class TextOffsets:
    """Character offsets of tokens in the text they make, token by token: a byte-level token
    may end inside a character, which then starts where that character does."""

    def __init__(self, start: int = 0) -> None:
        self.chars = start
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def next(self, token_bytes: bytes) -> int:
        offset = self.chars
        self.chars += len(self.decoder.decode(token_bytes))
        return offset


def completion_logprobs(
    entries: list[inference_pb2.TokenLogprob], offsets: TextOffsets
) -> dict[str, list]:
    """The completions API's `logprobs`: tokens, their log-probabilities, the most likely
    alternatives at each (with the token itself, as vLLM reports), and text offsets."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for e in entries:
        value = _value(e)
        out["tokens"].append(e.token)
        out["token_logprobs"].append(value)
        if value is None:
            out["top_logprobs"].append(None)
        else:
            top = {t.token: t.logprob for t in e.top}
            top.setdefault(e.token, value)
            out["top_logprobs"].append(top)
        out["text_offset"].append(offsets.next(e.token_bytes))
    return out


def chat_logprobs(entries: list[inference_pb2.TokenLogprob]) -> list[dict]:
    """The chat API's `logprobs.content`."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.token_bytes),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes)}
                for t in e.top
            ],
        }
        for e in entries
    ]
