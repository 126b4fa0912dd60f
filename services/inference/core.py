"""The inference core: one model version serving many concurrent streams, swappable live.

`Engine` is not thread-safe and every decode step is a burst of PyTorch work, so one dedicated
**step thread** owns the engines. It loops `engine.step()` while any engine has work and sleeps
on a condition otherwise. The asyncio side never touches an engine: it posts commands (submit,
cancel, adopt a new engine, inspect gates) to a queue that the step thread drains *between*
steps, and it receives each step's token events in one `loop.call_soon_threadsafe` per step and
event loop, which fans them out to per-request `asyncio.Queue`s. Every active sequence advances
together each step and new requests join between steps: continuous batching.

Hot swap: a new version is loaded off both threads, wrapped in a fresh `Engine`, and handed to
the step thread, which from its next step submits new requests to it. The previous engine keeps
stepping the sequences it already holds (running or queued) until they finish, then is dropped,
so no stream fails or changes model mid-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from shiftable_lib import checkpoint
from shiftable_lib.errors import Overloaded, Unavailable
from shiftable_lib.generate import Engine, SamplingParams, Sequence
from shiftable_lib.model import Routing
from shiftable_lib.tokenizer import encode

log = logging.getLogger("sma.inference")

T = TypeVar("T")


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
    swapping: bool
    load_error: str


@dataclass(eq=False)
class _Request:
    """A stream as both threads see it; `seq`, `engine` and `version_id` are set by the step
    thread when it submits the request."""

    prompt: str
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk | Exception]
    seq: Sequence | None = None
    engine: Engine | None = None
    version_id: str = ""


_Outbox = defaultdict[asyncio.AbstractEventLoop, list[tuple[_Request, Chunk | Exception]]]


class InferenceCore:
    """Serves generation and gate inspection from the loaded model version; see the module
    docstring for the threading model. Create it, `await load(...)`, then `generate`; `close()`
    when done."""

    def __init__(
        self,
        models_dir: Path,
        device: str | torch.device = "cpu",
        max_batch: int = 32,
        max_queue: int = 64,
    ) -> None:
        self.models_dir = models_dir
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.max_queue = max_queue
        # asyncio side
        self._version: checkpoint.ModelVersion | None = None
        self._load_lock = asyncio.Lock()
        self._swapping = False
        self._load_error = ""
        self._lock = threading.Lock()  # admission counters, touched from any event loop
        self._in_flight = 0
        self._requests_total = 0
        # shared: the command queue, guarded by the condition the step thread sleeps on
        self._wake = threading.Condition()
        self._commands: deque[Callable[[], None]] = deque()
        self._closing = False
        # step thread only (the counters are written there and read anywhere)
        self._engine: Engine | None = None
        self._engine_version = ""
        self._draining: list[Engine] = []
        self._requests: dict[int, _Request] = {}  # id(seq) -> request
        self._active = self._waiting = self._tokens = self._steps = 0
        self._thread = threading.Thread(target=self._run, name="sma-inference-step", daemon=True)
        self._thread.start()

    # ---- asyncio API --------------------------------------------------------------------------

    @property
    def version_id(self) -> str | None:
        """The version new requests are served by, or None before the first load."""
        return self._version.id if self._version else None

    async def load(self, version_id: str) -> None:
        """Load a version from `models_dir` and make it serve new requests from the next step;
        streams already running finish on the version they started on. If loading fails the
        old version keeps serving, `load_error` says why, and the error is raised."""
        async with self._load_lock:
            self._swapping = True
            try:
                version, engine = await asyncio.to_thread(self._prepare, version_id)
            except Exception as exc:
                self._load_error = f"loading {version_id} failed: {exc}"
                raise
            finally:
                self._swapping = False
            await self._call(partial(self._adopt, engine, version_id))
            self._version = version
            self._load_error = ""

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        """Stream a completion as `Chunk`s: one per decode step, or several steps merged into
        one when the consumer falls behind; the last one carries the finish reason, usage and
        gate means. Stopping early (closing the iterator, or cancelling the task that reads
        it) cancels the sequence at once and frees its slot."""
        version = self._require_model()
        params.validate(version.model.cfg.context)
        params.routing.allowed(version.model.experts)
        with self._lock:
            if self._in_flight >= self.max_batch + self.max_queue:
                raise Overloaded(
                    f"{self._in_flight} requests are running or queued, the most this server "
                    "takes: try again shortly"
                )
            self._in_flight += 1
            self._requests_total += 1
        request = _Request(prompt, params, asyncio.get_running_loop(), asyncio.Queue())
        finished = False
        try:
            self._post(partial(self._submit, request))
            while not finished:
                chunk = _merge_pending(await request.queue.get(), request.queue)
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            with self._lock:
                self._in_flight -= 1
            if not finished:
                with contextlib.suppress(Unavailable):  # closing: the thread cancels it anyway
                    self._post(partial(self._cancel, request))

    async def inspect_gates(self, prompt: str, routing: Routing) -> GateReport:
        """Gate weights of one forward pass over `prompt` (left-truncated to the context),
        run in the step thread between decode steps."""
        self._require_model()
        return await self._call(partial(self._inspect, prompt, routing))

    def info(self) -> Info:
        version = self._version
        cfg = version.model.cfg if version else None
        return Info(
            version_id=version.id if version else "",
            specialists=cfg.specialists if cfg else (),
            device=str(self.device),
            profile=version.profile.name if version else "",
            context=cfg.context if cfg else 0,
            n_layer=cfg.n_layer if cfg else 0,
            d_model=cfg.d_model if cfg else 0,
            vocab_size=cfg.vocab_size if cfg else 0,
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            active_streams=self._active,
            queued=self._waiting,
            tokens_generated=self._tokens,
            requests_total=self._requests_total,
            steps=self._steps,
            swapping=self._swapping,
            load_error=self._load_error,
        )

    def close(self) -> None:
        """Stop the step thread; streams still running end with finish reason "cancelled"."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    # ---- asyncio-side helpers -----------------------------------------------------------------

    def _require_model(self) -> checkpoint.ModelVersion:
        if self._version is None:
            raise Unavailable("no model is loaded yet")
        return self._version

    def _prepare(self, version_id: str) -> tuple[checkpoint.ModelVersion, Engine]:
        """Runs in a worker thread: reading weights and allocating a KV cache take a while."""
        version = checkpoint.load_version(self.models_dir, version_id, self.device)
        return version, Engine(version.model, version.tokenizer, self.max_batch)

    def _post(self, command: Callable[[], None]) -> None:
        with self._wake:
            if self._closing:
                raise Unavailable("the inference server is shutting down")
            self._commands.append(command)
            self._wake.notify()

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the step thread between steps and await its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def command() -> None:
            try:
                result = fn()
            except Exception as exc:
                _notify(loop, _settle, future, future.set_exception, exc)
            else:
                _notify(loop, _settle, future, future.set_result, result)

        self._post(command)
        return await future

    # ---- step thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._commands or self._closing or self._has_work()):
                    self._wake.wait()
                commands, closing = list(self._commands), self._closing
                self._commands.clear()
            for command in commands:
                try:
                    command()
                except Exception:
                    log.exception("an inference command failed")
            if closing:
                self._shutdown()
                return
            outbox = self._step() if self._has_work() else None
            self._publish_load()
            if outbox:
                _deliver_all(outbox)

    def _engines(self) -> list[Engine]:
        return [*self._draining, self._engine] if self._engine else self._draining

    def _has_work(self) -> bool:
        return any(engine.has_work() for engine in self._engines())

    def _step(self) -> _Outbox:
        """One decode step of every engine with work; returns what to deliver to whom."""
        outbox: _Outbox = defaultdict(list)
        for engine in self._engines():
            if not engine.has_work():
                continue
            try:
                events = engine.step()
            except Exception as exc:
                log.exception("a decode step failed; failing the streams it was running")
                self._fail(engine, exc, outbox)
                continue
            self._tokens += len(events)
            for event in events:
                request = self._requests[id(event.seq)]
                chunk = Chunk(event.text, (event.token_id,), request.version_id)
                if event.finish_reason is not None:
                    del self._requests[id(event.seq)]
                    chunk = _final(request, chunk)
                outbox[request.loop].append((request, chunk))
        self._steps += 1
        self._draining = [engine for engine in self._draining if engine.has_work()]
        return outbox

    def _publish_load(self) -> None:
        engines = self._engines()
        self._active = sum(len(engine.active) for engine in engines)
        self._waiting = sum(len(engine.queue) for engine in engines)

    def _submit(self, request: _Request) -> None:
        engine = self._engine
        assert engine is not None  # the asyncio side admits requests only once a model is loaded
        try:
            seq = engine.submit(request.prompt, request.params)
        except Exception as exc:  # the routing names an expert the newly adopted version lacks
            _notify(request.loop, request.queue.put_nowait, exc)
            return
        request.seq, request.engine, request.version_id = seq, engine, self._engine_version
        self._requests[id(seq)] = request

    def _cancel(self, request: _Request) -> None:
        seq = request.seq
        if seq is not None and self._requests.get(id(seq)) is request:
            del self._requests[id(seq)]
            assert request.engine is not None
            request.engine.cancel(seq)

    def _adopt(self, engine: Engine, version_id: str) -> None:
        if self._engine is not None and self._engine.has_work():
            self._draining.append(self._engine)
        self._engine, self._engine_version = engine, version_id

    def _fail(self, engine: Engine, exc: Exception, outbox: _Outbox) -> None:
        """End every stream of a failed engine with the error and give its model a fresh engine
        (its cache may be half-written), so that one bad step does not wedge the server."""
        for key, request in list(self._requests.items()):
            if request.engine is engine:
                del self._requests[key]
                outbox[request.loop].append((request, exc))
        if engine is self._engine:
            self._engine = Engine(engine.model, engine.tok, engine.max_batch)
        else:
            self._draining.remove(engine)

    def _inspect(self, prompt: str, routing: Routing) -> GateReport:
        engine = self._engine
        assert engine is not None
        model, tok = engine.model, engine.tok
        ids = encode(tok, prompt) or [engine.eos]
        truncated = max(0, len(ids) - model.cfg.context)
        ids = ids[truncated:]
        with torch.inference_mode():
            idx = torch.tensor([ids], device=engine.device)
            _, gates = model(idx, routing, return_gates=True)
            assert gates is not None
            weights = torch.stack(gates)[:, 0].float().cpu()  # (layers, positions, experts)
        return GateReport(
            version_id=self._engine_version,
            experts=model.experts,
            tokens=[tok.decode([i], skip_special_tokens=False) for i in ids],
            means=weights.mean(1).tolist(),
            per_position=weights.tolist(),
            truncated_prompt_tokens=truncated,
        )

    def _shutdown(self) -> None:
        outbox: _Outbox = defaultdict(list)
        for request in self._requests.values():
            assert request.engine is not None and request.seq is not None
            request.engine.cancel(request.seq)
            last = _final(request, Chunk("", (), request.version_id))
            outbox[request.loop].append((request, last))
        self._requests.clear()
        self._engine, self._draining = None, []
        self._publish_load()
        _deliver_all(outbox)


def _final(request: _Request, chunk: Chunk) -> Chunk:
    """The last chunk of a finished (or cancelled) sequence: its last delta plus the summary."""
    seq = request.seq
    assert seq is not None and request.engine is not None
    gate = seq.gate_mean  # (layers, experts); None if it ended before its first token
    means = gate.mean(0).tolist() if gate is not None else []
    return dataclasses.replace(
        chunk,
        finish_reason=seq.finish_reason,
        usage=Usage(len(seq.prompt_ids), len(seq.output_ids), seq.truncated),
        gate_means=dict(zip(request.engine.model.experts, means, strict=False)),
    )


def _merge_pending(first: Chunk | Exception, queue: asyncio.Queue[Chunk | Exception]) -> Chunk:
    """`first` plus whatever else is already queued, as one chunk (or the error that ended the
    stream): a slow consumer gets fewer, larger deltas instead of a growing backlog."""
    item = first
    while not isinstance(item, Exception) and item.finish_reason is None and not queue.empty():
        following = queue.get_nowait()
        if isinstance(following, Exception):
            item = following
        else:
            item = dataclasses.replace(
                following,
                text=item.text + following.text,
                token_ids=item.token_ids + following.token_ids,
            )
    if isinstance(item, Exception):
        raise item
    return item


def _deliver_all(outbox: _Outbox) -> None:
    for loop, items in outbox.items():
        _notify(loop, _deliver, items)


def _deliver(items: list[tuple[_Request, Chunk | Exception]]) -> None:
    for request, item in items:
        request.queue.put_nowait(item)


def _notify(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """Schedule `fn` on `loop` from the step thread; a closed loop has nobody left to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future[T], setter: Callable[..., None], value: object) -> None:
    if not future.done():  # done: the task awaiting it was cancelled
        setter(value)
