"""The inference core: one model version serving many concurrent streams, swappable live.

Process model. Decoding runs in a **worker process** (`services.inference.worker`, started with
multiprocessing "spawn"), not in the server's process: decoding in a thread of the grpc.aio
server process was measurably slower than in a process of its own. The likely reason, inferred
rather than profiled: a decode step is hundreds of tiny PyTorch ops that each release and
retake the GIL, and every time the event loop takes it in between, the decode thread sleeps
and is woken again. The server process keeps only the asyncio side and never holds a model.

`InferenceCore`, the asyncio side, admits requests (Overloaded, validation), keeps one
`asyncio.Queue` per stream and sends the worker commands over a `multiprocessing.Pipe` (the
messages are in `services.inference.messages`). A **reader thread** receives the worker's
events and hands each batch to the event loops concerned with one `call_soon_threadsafe`.

Hot swap: `load` makes the worker serve new requests from the new version while the streams it
already runs finish on the old one (see the worker's docstring).

A worker that dies fails every in-flight stream and pending call with `Unavailable`, and the
reader thread starts a new worker that loads the version being served.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from services.inference import worker
from services.inference.messages import (
    IDLE,
    CallFailed,
    Cancel,
    Chunk,
    Chunks,
    Command,
    GateReport,
    Info,
    Inspect,
    Inspected,
    Load,
    Loaded,
    LoadedVersion,
    Shutdown,
    Stats,
    StreamFailed,
    Submit,
)
from shiftable_lib.errors import Overloaded, Unavailable
from shiftable_lib.sampling import MAX_PROMPT_CHARS, Routing, SamplingParams, validate_prompt
from shiftable_lib.tokenizer import EOS, Vocabulary, encode

log = logging.getLogger("sma.inference")

RESTART_DELAY_S = 0.5  # between a worker's death and its replacement, so a crash cannot spin
CLOSE_TIMEOUT_S = 30.0


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Chunk | Exception]


@dataclass(eq=False)
class _Call:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


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
        dtype: str = "auto",
        bf16_threads: int = 0,
    ) -> None:
        """`threads`: the worker's torch threads (0: this process's); `bf16_threads`: those of
        a version served in bfloat16 on the CPU (0: `threads`)."""
        self.models_dir = models_dir
        self.cuda_graphs = cuda_graphs  # the worker's engines replay CUDA graphs on a GPU
        self.dtype = dtype  # of the weights and KV cache (checkpoint.serving_dtype)
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._threads = threads or torch.get_num_threads()  # the worker's torch threads
        self._bf16_threads = bf16_threads or self._threads
        self._version: LoadedVersion | None = None
        self._vocabularies: dict[str, Vocabulary] = {}  # by version id
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
        self._stats = IDLE
        self._retired = IDLE  # tokens, steps and seconds of workers that have died
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
                loaded: LoadedVersion = await self._call(lambda call_id: Load(call_id, version_id))
            except Exception as exc:
                self._load_error = f"loading {version_id} failed: {exc}"
                raise
            finally:
                self._swapping = False
            vocabulary = await asyncio.to_thread(Vocabulary, loaded.tokenizer)
            self._vocabularies = {
                **{k: v for k, v in self._vocabularies.items() if k == self.version_id},
                loaded.id: vocabulary,
            }  # this one and the one before, whose streams may still be running
            self._version = loaded
            self._load_error = ""

    async def generate(
        self, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[Chunk]:
        """Stream a completion as `Chunk`s: one per decode step, or several steps merged into
        one when the consumer falls behind; the last one carries the finish reason, usage and
        gate means. `prompt` is text or token ids. Stopping early (closing the iterator, or
        cancelling the task that reads it) cancels the sequence at once and frees its slot."""
        version = self._require_model()
        if isinstance(prompt, str):
            validate_prompt(prompt)
        else:
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"the prompt is {len(prompt)} tokens; at most {MAX_PROMPT_CHARS}")
            self.vocabulary().check(prompt)
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
            self._send(Submit(stream_id, prompt, params))
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
                    self._send(Cancel(stream_id))

    async def inspect_gates(self, prompt: str, routing: Routing) -> GateReport:
        """Gate weights of one forward pass over `prompt` (left-truncated to the context),
        run in the worker between decode steps."""
        self._require_model()
        validate_prompt(prompt)
        return await self._call(lambda call_id: Inspect(call_id, prompt, routing))

    def vocabulary(self, version_id: str = "") -> Vocabulary:
        """The tokens of `version_id` (one that serves or served last), else of the serving
        version."""
        self._require_model()
        found = self._vocabularies.get(version_id) if version_id else None
        return found or self._vocabularies[self.version_id or ""]

    def tokenize(self, text: str) -> tuple[list[int], Vocabulary]:
        """`text` as the serving version's token ids, and its vocabulary."""
        validate_prompt(text)
        vocabulary = self.vocabulary()
        return encode(vocabulary.tok, text), vocabulary

    def info(self) -> Info:
        version = self._version
        cfg = version.cfg if version else None
        stats, retired = self._stats, self._retired
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
            tokens_generated=retired.tokens + stats.tokens,
            requests_total=self._requests_total,
            steps=retired.steps + stats.steps,
            decode_seconds=retired.seconds + stats.seconds,
            swapping=self._swapping,
            load_error=self._load_error,
            eos_token=((version.stop_tokens or (EOS,))[0]) if version else "",
            chat_template=version.chat_template if version else "",
            dtype=version.dtype if version else "",
            threads=version.threads if version else 0,
        )

    def close(self) -> None:
        """Stop the worker; streams still running end with finish reason "cancelled"."""
        with self._send_lock:
            if not self._closing:
                self._closing = True
                with contextlib.suppress(OSError):
                    self._conn.send(Shutdown())
        self._reader.join(CLOSE_TIMEOUT_S)
        self._process.join(CLOSE_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    # ---- asyncio-side helpers -----------------------------------------------------------------

    def _require_model(self) -> LoadedVersion:
        if self._version is None:
            raise Unavailable("no model is loaded yet")
        return self._version

    def _send(self, command: Command) -> None:
        with self._send_lock:
            if self._closing:
                raise Unavailable("the inference server is shutting down")
            try:
                self._conn.send(command)
            except OSError as exc:  # the worker died; the reader thread is replacing it
                raise Unavailable("the inference worker is restarting: try again shortly") from exc

    async def _call(self, command: Callable[[int], Command]) -> Any:
        """Send the worker a command that answers with one event, and await its outcome."""
        loop = asyncio.get_running_loop()
        call = _Call(loop, loop.create_future())
        with self._lock:
            call_id = next(self._ids)
            self._calls[call_id] = call
        try:
            self._send(command(call_id))
            return await call.future
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    # ---- the worker process, seen from the server process --------------------------------------

    def _start_worker(self, version_id: str | None) -> tuple[Connection, BaseProcess]:
        context = multiprocessing.get_context("spawn")  # fork would copy the gRPC core's threads
        conn, child = context.Pipe()
        process = context.Process(
            target=worker.main,
            args=(child, self.models_dir, str(self.device), self.max_batch, self._threads),
            kwargs={
                "version_id": version_id,
                "cuda_graphs": self.cuda_graphs,
                "dtype": self.dtype,
                "bf16_threads": self._bf16_threads,
            },
            name="sma-inference-worker",
            daemon=True,
        )
        process.start()
        child.close()
        return conn, process

    def _read(self) -> None:
        """The reader thread: hand the worker's events to the event loops waiting on them,
        and replace a worker that dies."""
        while True:
            try:
                event = self._conn.recv()
            except (EOFError, OSError):
                if not self._replace_worker():
                    return
                continue
            match event:
                case Chunks(chunks, stats):
                    self._stats = stats
                    self._deliver(chunks)
                case StreamFailed(stream_id, error):
                    self._deliver([(stream_id, error)])
                case Loaded(call_id, outcome) | Inspected(call_id, outcome):
                    self._answer(call_id, outcome)
                case CallFailed(call_id, error):
                    self._answer(call_id, error)
                case _:
                    log.error("ignoring an unknown event from the inference worker: %r", event)

    def _deliver(self, items: Iterable[tuple[int, Chunk | Exception]]) -> None:
        """Queue each item on its stream, one wake-up per event loop; the last chunk of a
        stream, or an error, unregisters it."""
        by_loop: defaultdict[asyncio.AbstractEventLoop, list[tuple[_Stream, Chunk | Exception]]]
        by_loop = defaultdict(list)
        with self._lock:
            for stream_id, item in items:
                last = isinstance(item, Exception) or item.finish_reason is not None
                stream = (
                    self._streams.pop(stream_id, None) if last else self._streams.get(stream_id)
                )
                if stream is not None:  # else the consumer has gone already
                    by_loop[stream.loop].append((stream, item))
        for loop, deliveries in by_loop.items():
            _notify(loop, _put_all, deliveries)

    def _answer(self, call_id: int, outcome: object) -> None:
        with self._lock:
            call = self._calls.get(call_id)
        if call is not None:  # else the caller was cancelled
            _notify(call.loop, _settle, call.future, outcome)

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
            streams, calls = list(self._streams.values()), list(self._calls.values())
            self._streams.clear()
            self._calls.clear()
        for stream in streams:
            _notify(stream.loop, stream.queue.put_nowait, error)
        for call in calls:
            _notify(call.loop, _settle, call.future, error)
        self._retired = _totals(self._retired, self._stats)
        self._stats = IDLE
        if closing:
            return False
        time.sleep(RESTART_DELAY_S)
        with self._send_lock:
            if self._closing:
                return False
            version = self._version
            self._conn, self._process = self._start_worker(version.id if version else None)
        return True


def _totals(retired: Stats, stats: Stats) -> Stats:
    """The running totals of the workers gone so far, once the current one has gone too."""
    return Stats(
        0,
        0,
        retired.tokens + stats.tokens,
        retired.steps + stats.steps,
        retired.seconds + stats.seconds,
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
                logprobs=item.logprobs + following.logprobs,
                prompt=item.prompt,
                prompt_logprobs=item.prompt_logprobs,
            )
    if isinstance(item, Exception):
        raise item
    return item


def _close_at_exit(ref: weakref.ref[InferenceCore]) -> None:
    core = ref()
    if core is not None:
        core.close()


def _put_all(deliveries: list[tuple[_Stream, Chunk | Exception]]) -> None:
    for stream, item in deliveries:
        stream.queue.put_nowait(item)


def _notify(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    """Schedule `fn` on `loop` from the reader thread; a closed loop has nobody left to tell."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future[Any], outcome: object) -> None:
    """Resolve a call's future with its outcome, raising it where it is an error."""
    if future.done():  # the task awaiting it was cancelled
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
