"""The inference core: one model version serving many concurrent streams, swappable live.

Process model. Decoding runs in a **worker process** (multiprocessing "spawn"), not in the
server's process. Measured in interleaved rounds (one stream, one torch thread): decoding in a
thread of the grpc.aio server process reached 0.71x of a bare `Engine`, in its own process
0.90x. The likely reason, inferred rather than profiled: a decode step is hundreds of tiny
PyTorch ops that each release and retake the GIL, and every time the event loop takes it in
between, the decode thread sleeps and is woken again. The server process keeps only the
asyncio side and never holds a model.

- Parent (`InferenceCore`, asyncio side): admits requests (Overloaded, validation), keeps one
  `asyncio.Queue` per stream and sends commands to the worker over a `multiprocessing.Pipe`:
  load, submit, cancel, inspect gates, close. A **reader thread** receives the worker's
  messages and hands each to the event loops concerned with one `call_soon_threadsafe`.
- Worker (`_Worker`): owns the `Engine`s. It loops `engine.step()` while any engine has work,
  applies the commands that arrived *between* steps, and sends one message per step with that
  step's chunks plus its load counters. Every active sequence advances together each step and
  new requests join between steps: continuous batching. When idle it blocks on the pipe.

Hot swap: the worker loads a new version in a helper thread while it keeps stepping, then
submits new requests to a fresh `Engine` over it. The previous engine keeps stepping the
sequences it already holds (running or queued) until they finish, then is dropped, so no stream
fails or changes model mid-way.

A worker that dies fails every in-flight stream and pending call with `Unavailable`, and the
reader thread starts a new worker that loads the version being served. The worker ignores
SIGINT/SIGTERM (the server process shuts it down through `close()`) and exits when the pipe
closes, so it never outlives the server.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, TypeVar

import torch

from shiftable_lib import checkpoint
from shiftable_lib.errors import Overloaded, Unavailable
from shiftable_lib.generate import Engine, Sequence
from shiftable_lib.model import ModelConfig
from shiftable_lib.sampling import Routing, SamplingParams

log = logging.getLogger("sma.inference")

T = TypeVar("T")
RESTART_DELAY_S = 0.5  # between a worker's death and its replacement, so a crash cannot spin
CLOSE_TIMEOUT_S = 30.0


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
    decode_seconds: float  # wall time spent in those steps; / steps is the mean step time
    swapping: bool
    load_error: str


@dataclass(frozen=True)
class _Loaded:
    """What the server process knows of a loaded version (the weights live in the worker)."""

    id: str
    cfg: ModelConfig
    profile: str


@dataclass(frozen=True)
class _Stats:
    active: int
    queued: int
    tokens: int
    steps: int
    seconds: float = 0.0  # in decode steps


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk | Exception]


@dataclass(eq=False)
class _Call:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


# Messages. Parent -> worker: ("load", call_id, version_id), ("submit", stream_id, prompt,
# params), ("cancel", stream_id), ("inspect", call_id, prompt, routing), ("close",).
# Worker -> parent, one per step or batch of commands: (items, _Stats), where an item is
# ("chunk", stream_id, Chunk), ("error", stream_id, exception) or
# ("result", call_id, ok, value_or_exception).


class InferenceCore:
    """Serves generation and gate inspection from the loaded model version; see the module
    docstring for the process model. Create it, `await load(...)`, then `generate`; `close()`
    when done."""

    def __init__(
        self,
        models_dir: Path,
        device: str | torch.device = "cpu",
        max_batch: int = 32,
        max_queue: int = 64,
        threads: int = 0,
        cuda_graphs: bool = True,
    ) -> None:
        self.models_dir = models_dir
        self.cuda_graphs = cuda_graphs  # the worker's engines replay CUDA graphs on a GPU
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._threads = threads or torch.get_num_threads()  # the worker's torch threads
        self._version: _Loaded | None = None
        self._load_lock = asyncio.Lock()
        self._swapping = False
        self._load_error = ""
        self._lock = threading.Lock()  # admission counters and the id -> stream/call tables
        self._in_flight = 0
        self._requests_total = 0
        self._ids = itertools.count()
        self._streams: dict[int, _Stream] = {}
        self._calls: dict[int, _Call] = {}
        self._send_lock = threading.Lock()  # the pipe, `_closing` and the worker handle
        self._closing = False
        # written by the reader thread, read anywhere
        self._stats = _Stats(0, 0, 0, 0)
        self._counted = _Stats(0, 0, 0, 0)  # tokens and steps of workers that have died
        self._conn, self._process = self._start_worker(None)
        self._reader = threading.Thread(target=self._read, name="sma-inference-reader", daemon=True)
        self._reader.start()
        # a process that exits without close() (an unhandled error) would otherwise hang at exit:
        # multiprocessing joins the worker, which ignores SIGTERM and waits for the pipe to close
        atexit.register(_close_at_exit, weakref.ref(self))

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
                loaded = await self._call(lambda call_id: ("load", call_id, version_id))
            except Exception as exc:
                self._load_error = f"loading {version_id} failed: {exc}"
                raise
            finally:
                self._swapping = False
            self._version = loaded
            self._load_error = ""

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        """Stream a completion as `Chunk`s: one per decode step, or several steps merged into
        one when the consumer falls behind; the last one carries the finish reason, usage and
        gate means. Stopping early (closing the iterator, or cancelling the task that reads
        it) cancels the sequence at once and frees its slot."""
        version = self._require_model()
        params.validate(version.cfg.context)
        params.routing.allowed(version.cfg.experts)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._in_flight >= self.max_batch + self.max_queue:
                raise Overloaded(
                    f"{self._in_flight} requests are running or queued, the most this server "
                    "takes: try again shortly"
                )
            self._in_flight += 1
            self._requests_total += 1
            stream_id = next(self._ids)
            self._streams[stream_id] = stream
        finished = False
        try:
            self._send(("submit", stream_id, prompt, params))
            while not finished:
                chunk = _merge_pending(await stream.queue.get(), stream.queue)
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            with self._lock:
                self._in_flight -= 1
                self._streams.pop(stream_id, None)
            if not finished:
                with contextlib.suppress(Unavailable):  # closing or restarting: it is gone anyway
                    self._send(("cancel", stream_id))

    async def inspect_gates(self, prompt: str, routing: Routing) -> GateReport:
        """Gate weights of one forward pass over `prompt` (left-truncated to the context),
        run in the worker between decode steps."""
        self._require_model()
        return await self._call(lambda call_id: ("inspect", call_id, prompt, routing))

    def info(self) -> Info:
        version = self._version
        cfg = version.cfg if version else None
        stats, counted = self._stats, self._counted
        return Info(
            version_id=version.id if version else "",
            specialists=cfg.specialists if cfg else (),
            device=str(self.device),
            profile=version.profile if version else "",
            context=cfg.context if cfg else 0,
            n_layer=cfg.n_layer if cfg else 0,
            d_model=cfg.d_model if cfg else 0,
            vocab_size=cfg.vocab_size if cfg else 0,
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            active_streams=stats.active,
            queued=stats.queued,
            tokens_generated=counted.tokens + stats.tokens,
            requests_total=self._requests_total,
            steps=counted.steps + stats.steps,
            decode_seconds=counted.seconds + stats.seconds,
            swapping=self._swapping,
            load_error=self._load_error,
        )

    def close(self) -> None:
        """Stop the worker; streams still running end with finish reason "cancelled"."""
        with self._send_lock:
            if not self._closing:
                self._closing = True
                with contextlib.suppress(OSError):
                    self._conn.send(("close",))
        self._reader.join(CLOSE_TIMEOUT_S)
        self._process.join(CLOSE_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    # ---- asyncio-side helpers -----------------------------------------------------------------

    def _require_model(self) -> _Loaded:
        if self._version is None:
            raise Unavailable("no model is loaded yet")
        return self._version

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            if self._closing:
                raise Unavailable("the inference server is shutting down")
            try:
                self._conn.send(message)
            except OSError as exc:  # the worker died; the reader thread is replacing it
                raise Unavailable("the inference worker is restarting: try again shortly") from exc

    async def _call(self, message: Callable[[int], tuple]) -> Any:
        """Send the worker a command that answers with one result, and await that result."""
        loop = asyncio.get_running_loop()
        call = _Call(loop, loop.create_future())
        with self._lock:
            call_id = next(self._ids)
            self._calls[call_id] = call
        try:
            self._send(message(call_id))
            return await call.future
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    # ---- the worker process, seen from the server process --------------------------------------

    def _start_worker(self, version_id: str | None) -> tuple[Connection, Any]:
        context = multiprocessing.get_context("spawn")  # fork would copy the gRPC core's threads
        conn, child = context.Pipe()
        process = context.Process(
            target=_worker_main,
            args=(child, self.models_dir, str(self.device), self.max_batch, self._threads),
            kwargs={"version_id": version_id, "cuda_graphs": self.cuda_graphs},
            name="sma-inference-worker",
            daemon=True,
        )
        process.start()
        child.close()
        return conn, process

    def _read(self) -> None:
        """The reader thread: hand the worker's messages to the event loops waiting on them,
        and replace a worker that dies."""
        while True:
            try:
                items, stats = self._conn.recv()
            except (EOFError, OSError):
                if not self._replace_worker():
                    return
                continue
            self._stats = stats
            self._dispatch(items)

    def _dispatch(self, items: list[tuple]) -> None:
        by_loop: defaultdict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = defaultdict(
            list
        )
        with self._lock:
            for item in items:
                kind, key = item[0], item[1]
                if kind == "result":
                    call = self._calls.get(key)
                    if call is not None:
                        setter = call.future.set_result if item[2] else call.future.set_exception
                        by_loop[call.loop].append(_bind(_settle, call.future, setter, item[3]))
                else:  # "chunk" or "error"; the last one of a stream unregisters it
                    last = kind == "error" or item[2].finish_reason is not None
                    stream = self._streams.pop(key, None) if last else self._streams.get(key)
                    if stream is not None:  # else the consumer has gone already
                        by_loop[stream.loop].append(_bind(stream.queue.put_nowait, item[2]))
        for loop, callbacks in by_loop.items():
            _notify(loop, _run_all, callbacks)

    def _replace_worker(self) -> bool:
        """The pipe closed: after `close()` that is the end; otherwise the worker died, so fail
        whatever it was doing and start another. Returns whether to keep reading."""
        self._process.join(CLOSE_TIMEOUT_S)
        if self._process.is_alive():  # closed its end of the pipe but hangs: no use to anyone
            self._process.kill()
            self._process.join()
        code = self._process.exitcode
        with self._send_lock:
            closing = self._closing
            if not closing:
                log.error("the inference worker died (exit code %s); restarting it", code)
                self._conn.close()
        error = Unavailable(
            "the inference server is shutting down"
            if closing
            else f"the inference worker process died (exit code {code}); try again shortly"
        )
        with self._lock:
            lost: list[tuple] = [
                (s.loop, s.queue.put_nowait, error) for s in self._streams.values()
            ]
            lost += [
                (c.loop, _settle, c.future, c.future.set_exception, error)
                for c in self._calls.values()
            ]
            self._streams.clear()
            self._calls.clear()
        for loop, fn, *args in lost:
            _notify(loop, fn, *args)
        stats = self._stats
        counted = self._counted
        self._counted = _Stats(
            0,
            0,
            counted.tokens + stats.tokens,
            counted.steps + stats.steps,
            counted.seconds + stats.seconds,
        )
        self._stats = _Stats(0, 0, 0, 0)
        if closing:
            return False
        time.sleep(RESTART_DELAY_S)
        with self._send_lock:
            if self._closing:
                return False
            version = self._version
            self._conn, self._process = self._start_worker(version.id if version else None)
        return True


# ---- the worker process ---------------------------------------------------------------------


def _worker_main(
    conn: Connection,
    models_dir: Path,
    device: str,
    max_batch: int,
    threads: int,
    version_id: str | None = None,
    cuda_graphs: bool = True,
) -> None:
    """Entry point of the worker process (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when it ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    worker = _Worker(conn, models_dir, torch.device(device), max_batch, cuda_graphs)
    if version_id is not None:  # a replacement worker: serve what the last one served
        try:
            worker.adopt(*worker.prepare(version_id))
        except Exception:
            log.exception("the new inference worker cannot load %s", version_id)
    with contextlib.suppress(EOFError, OSError):  # the server process has gone
        worker.run()


@dataclass(eq=False)
class _Request:
    """A stream as the worker sees it."""

    stream_id: int
    seq: Sequence
    engine: Engine
    version_id: str


class _Worker:
    """Owns the engines and runs the step loop; everything here runs in the worker process."""

    def __init__(
        self,
        conn: Connection,
        models_dir: Path,
        device: torch.device,
        max_batch: int,
        cuda_graphs: bool = True,
    ):
        self.conn = conn
        self.models_dir = models_dir
        self.device = device
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self.engine: Engine | None = None
        self.engine_version = ""
        self.draining: list[Engine] = []
        self.requests: dict[int, _Request] = {}  # stream id -> request
        self.by_seq: dict[int, _Request] = {}  # id(seq) -> request
        self.tokens = self.steps = 0
        self.seconds = 0.0  # in steps
        self.sent = _Stats(0, 0, 0, 0)
        # versions loaded by helper threads, adopted by the step loop; the pipe wakes it up
        self.loaded: deque[tuple[int, bool, object]] = deque()
        self.wake_r, self.wake_w = os.pipe()

    def run(self) -> None:
        while True:
            out: list[tuple] = []
            if not self.has_work():
                wait([self.conn, self.wake_r])
            while self.conn.poll():
                message = self.conn.recv()
                if message[0] == "close":
                    self.shutdown(out)
                    return
                self.command(message, out)
            self.adopt_loaded(out)
            if self.has_work():
                self.step(out)
            self.publish(out)

    def publish(self, out: list[tuple], force: bool = False) -> None:
        engines = self.engines()
        stats = _Stats(
            sum(len(engine.active) for engine in engines),
            sum(len(engine.queue) for engine in engines),
            self.tokens,
            self.steps,
            self.seconds,
        )
        if out or force or stats != self.sent:
            self.conn.send((out, stats))
            self.sent = stats

    def engines(self) -> list[Engine]:
        return [*self.draining, self.engine] if self.engine else self.draining

    def has_work(self) -> bool:
        return any(engine.has_work() for engine in self.engines())

    def command(self, message: tuple, out: list[tuple]) -> None:
        kind = message[0]
        if kind == "submit":
            self.submit(*message[1:], out=out)
        elif kind == "cancel":
            self.cancel(message[1])
        elif kind == "inspect":
            _, call_id, prompt, routing = message
            try:
                out.append(("result", call_id, True, self.inspect(prompt, routing)))
            except Exception as exc:
                out.append(("result", call_id, False, _picklable(exc)))
        elif kind == "load":
            threading.Thread(target=self.load, args=message[1:], daemon=True).start()
        else:
            raise ValueError(f"unknown inference command {kind!r}")

    def prepare(self, version_id: str) -> tuple[Engine, _Loaded]:
        """Reading weights and allocating a KV cache take a while: a helper thread does it."""
        version = checkpoint.load_version(self.models_dir, version_id, self.device)
        engine = Engine(version.model, version.tokenizer, self.max_batch, self.cuda_graphs)
        return engine, _Loaded(version_id, version.model.cfg, version.profile.name)

    def load(self, call_id: int, version_id: str) -> None:
        try:
            result: object = self.prepare(version_id)
            ok = True
        except Exception as exc:
            result, ok = _picklable(exc), False
        self.loaded.append((call_id, ok, result))
        os.write(self.wake_w, b"x")

    def adopt_loaded(self, out: list[tuple]) -> None:
        while self.loaded:
            os.read(self.wake_r, 1)
            call_id, ok, result = self.loaded.popleft()
            if ok:
                engine, loaded = result  # type: ignore[misc]
                self.adopt(engine, loaded)
                result = loaded
            out.append(("result", call_id, ok, result))

    def adopt(self, engine: Engine, loaded: _Loaded) -> None:
        if self.engine is not None and self.engine.has_work():
            self.draining.append(self.engine)
        self.engine, self.engine_version = engine, loaded.id

    def submit(self, stream_id: int, prompt: str, params: SamplingParams, out: list) -> None:
        engine = self.engine
        try:
            if engine is None:
                raise Unavailable("the inference worker has no model loaded")
            seq = engine.submit(prompt, params)
        except Exception as exc:  # the routing names an expert the newly adopted version lacks
            out.append(("error", stream_id, _picklable(exc)))
            return
        request = _Request(stream_id, seq, engine, self.engine_version)
        self.requests[stream_id] = self.by_seq[id(seq)] = request

    def cancel(self, stream_id: int) -> None:
        request = self.requests.pop(stream_id, None)
        if request is not None:
            del self.by_seq[id(request.seq)]
            request.engine.cancel(request.seq)
            # a draining engine whose last stream was cancelled goes now, not at the next step
            self.draining = [e for e in self.draining if e.has_work()]

    def forget(self, request: _Request) -> None:
        del self.requests[request.stream_id], self.by_seq[id(request.seq)]

    def step(self, out: list[tuple]) -> None:
        """One decode step of every engine with work."""
        for engine in self.engines():
            if not engine.has_work():
                continue
            start = time.perf_counter()
            try:
                events = engine.step()
            except Exception as exc:
                log.exception("a decode step failed; failing the streams it was running")
                self.fail(engine, exc, out)
                continue
            self.seconds += time.perf_counter() - start
            self.tokens += len(events)
            for event in events:
                request = self.by_seq[id(event.seq)]
                chunk = Chunk(event.text, (event.token_id,), request.version_id)
                if event.finish_reason is not None:
                    self.forget(request)
                    chunk = _final(request, chunk)
                out.append(("chunk", request.stream_id, chunk))
        self.steps += 1
        self.draining = [engine for engine in self.draining if engine.has_work()]

    def fail(self, engine: Engine, exc: Exception, out: list[tuple]) -> None:
        """End every stream of a failed engine with the error and give its model a fresh engine
        (its cache may be half-written), so that one bad step does not wedge the server."""
        error = _picklable(exc)
        for request in list(self.requests.values()):
            if request.engine is engine:
                self.forget(request)
                out.append(("error", request.stream_id, error))
        if engine is self.engine:
            self.engine = Engine(engine.model, engine.tok, engine.max_batch, self.cuda_graphs)
        else:
            self.draining.remove(engine)

    def inspect(self, prompt: str, routing: Routing) -> GateReport:
        engine = self.engine
        if engine is None:
            raise Unavailable("the inference worker has no model loaded")
        model, tok = engine.model, engine.tok
        ids, truncated = engine.prompt_ids(prompt, model.cfg.context)
        with torch.inference_mode():
            idx = torch.tensor([ids], device=engine.device)
            _, gates = model(idx, routing, return_gates=True)
            assert gates is not None
            weights = torch.stack(gates)[:, 0].float().cpu()  # (layers, positions, experts)
        return GateReport(
            version_id=self.engine_version,
            experts=model.experts,
            tokens=[tok.decode([i], skip_special_tokens=False) for i in ids],
            means=weights.mean(1).tolist(),
            per_position=weights.tolist(),
            truncated_prompt_tokens=truncated,
        )

    def shutdown(self, out: list[tuple]) -> None:
        for request in self.requests.values():
            request.engine.cancel(request.seq)
            out.append(
                ("chunk", request.stream_id, _final(request, Chunk("", (), request.version_id)))
            )
        self.requests.clear()
        self.by_seq.clear()
        self.engine, self.draining = None, []
        self.publish(out, force=True)


def _final(request: _Request, chunk: Chunk) -> Chunk:
    """The last chunk of a finished (or cancelled) sequence: its last delta plus the summary."""
    seq = request.seq
    gate = seq.gate_mean  # (layers, experts); None if it ended before its first token
    means = gate.mean(0).tolist() if gate is not None else []
    return dataclasses.replace(
        chunk,
        finish_reason=seq.finish_reason,
        usage=Usage(len(seq.prompt_ids), len(seq.output_ids), seq.truncated),
        gate_means=dict(zip(request.engine.model.experts, means, strict=False)),
    )


def _picklable(exc: Exception) -> Exception:
    """`exc`, or a RuntimeError with its message where it cannot cross the pipe."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


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


def _close_at_exit(ref: weakref.ref[InferenceCore]) -> None:
    core = ref()
    if core is not None:
        core.close()


def _bind(fn: Callable[..., object], *args: object) -> Callable[[], None]:
    return lambda: fn(*args)  # type: ignore[func-returns-value]


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        callback()


def _notify(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """Schedule `fn` on `loop` from the reader thread; a closed loop has nobody left to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future[T], setter: Callable[..., None], value: object) -> None:
    if not future.done():  # done: the task awaiting it was cancelled
        setter(value)
