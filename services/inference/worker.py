"""The inference worker process: it owns the model's `Engine`s and runs the decode loop.

`Worker.run` steps while any engine has work, applies the commands that arrived *between*
steps, and sends one `Chunks` per step with that step's chunks plus its load counters. Every
active sequence advances together each step and new requests join between steps: continuous
batching. When idle it blocks on the pipe.

A long text prompt is tokenised in a helper thread too (the tokenizer lets go of the GIL),
then joins the engine it was submitted to: the streams decoding meanwhile do not wait for it.
Helper threads hand what they finished to the loop (`hand_over`), which takes it up between
steps.

Hot swap: a `Load` is read and its KV cache allocated in a helper thread while the loop keeps
stepping; the loop then submits new requests to the fresh `Engine`. The previous engine keeps
stepping the sequences it already holds (running or queued) until they finish, then is
dropped, so no stream fails or changes model mid-way.

The process ignores SIGINT/SIGTERM (the server process ends it with `Shutdown`) and exits when
the pipe closes, so it never outlives the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from services.inference.messages import (
    IDLE,
    CallFailed,
    Cancel,
    Chunk,
    Chunks,
    Command,
    Event,
    GateReport,
    Inspect,
    Inspected,
    Load,
    Loaded,
    LoadedVersion,
    Shutdown,
    Stats,
    StreamFailed,
    Submit,
    Usage,
)
from shiftable_lib import checkpoint
from shiftable_lib.errors import Unavailable
from shiftable_lib.generate import Engine, Sequence, TokenEvent
from shiftable_lib.sampling import Routing, SamplingParams
from shiftable_lib.tokenizer import encode_apart

log = logging.getLogger("sma.inference")
TOKENIZE_APART_CHARS = 4096  # longer text prompts are tokenised off the step loop


def main(
    conn: Connection,
    models_dir: Path,
    device: str,
    max_batch: int,
    threads: int,
    version_id: str | None = None,
    cuda_graphs: bool = True,
    dtype: str = "auto",
    bf16_threads: int = 0,
) -> None:
    """Entry point of the worker process. `version_id` is set for a worker that replaces one
    that died: it serves what that one served, without waiting to be asked. `threads` and
    `bf16_threads`: as `Worker`'s."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when it ends
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pin_threads(threads)
    worker = Worker(
        conn, models_dir, torch.device(device), max_batch, cuda_graphs, dtype, threads, bf16_threads
    )
    if version_id is not None:
        try:
            worker.adopt(*worker.prepare(version_id))
        except Exception:
            log.exception("the new inference worker cannot load %s", version_id)
    with contextlib.suppress(EOFError, OSError):  # the server process has gone
        worker.run()


def pin_threads(threads: int) -> None:
    """Set this thread's torch thread count, for good. A thread takes the process-wide count
    (the last any thread set) at its first parallel operation, unless it has asked for its
    count before: asking first keeps a helper thread's later count from reaching it."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


@dataclass(eq=False)
class _Request:
    """A stream as the worker sees it."""

    stream_id: int
    seq: Sequence
    engine: Engine
    version_id: str
    started: bool = False  # whether its first chunk has gone


_Prepared = tuple[Engine, LoadedVersion]


class Worker:
    """Owns the engines and runs the step loop; everything here runs in the worker process.

    Each version decodes on `threads` torch threads, or on `bf16_threads` where it is served
    in bfloat16 on the CPU (0: `threads`; 0 for both: torch's count when a version is made)."""

    def __init__(
        self,
        conn: Connection,
        models_dir: Path,
        device: torch.device,
        max_batch: int,
        cuda_graphs: bool = True,
        dtype: str = "auto",
        threads: int = 0,
        bf16_threads: int = 0,
    ) -> None:
        self.conn = conn
        self.models_dir = models_dir
        self.device = device
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self.dtype = dtype  # a `checkpoint.serving_dtype` name: each version's own choice
        self.threads = threads
        self.bf16_threads = bf16_threads or threads
        self.engine: Engine | None = None
        self.engine_version = ""
        self.draining: list[Engine] = []
        self.requests: dict[int, _Request] = {}  # stream id -> request
        self.by_seq: dict[int, _Request] = {}  # id(seq) -> request
        self.tokens = self.steps = 0
        self.seconds = 0.0  # in steps
        self.sent = IDLE
        # what helper threads finished (a version prepared, a long prompt tokenised), for the
        # step loop to take up between steps; one byte in the pipe per item wakes it up
        self.handed: deque[Callable[[], None]] = deque()
        self.wake_r, self.wake_w = os.pipe()
        # long prompts being tokenised (stream id -> its engine and that engine's version)
        self.tokenizing: dict[int, tuple[Engine, str]] = {}

    def run(self) -> None:
        """Step while there is work, apply commands between steps, block when idle."""
        while True:
            if not self.has_work():
                wait([self.conn, self.wake_r])
            while self.conn.poll():
                command: Command = self.conn.recv()
                if isinstance(command, Shutdown):
                    self.shutdown()
                    return
                self.apply(command)
            self.take_handed()
            self.publish(self.step() if self.has_work() else [])

    def apply(self, command: Command) -> None:
        match command:
            case Submit(stream_id, prompt, params):
                self.submit(stream_id, prompt, params)
            case Cancel(stream_id):
                self.cancel(stream_id)
            case Inspect(call_id, prompt, routing):
                try:
                    answer: Event = Inspected(call_id, self.inspect(prompt, routing))
                except Exception as exc:
                    answer = CallFailed(call_id, _picklable(exc))
                self.conn.send(answer)
            case Load(call_id, version_id):
                threading.Thread(target=self.load, args=(call_id, version_id), daemon=True).start()
            case _:
                raise ValueError(f"unknown inference command {command!r}")

    def publish(self, chunks: list[tuple[int, Chunk]], force: bool = False) -> None:
        """Send a step's chunks with the counters; nothing when neither has news."""
        engines = self.engines()
        stats = Stats(
            sum(len(engine.active) for engine in engines),
            sum(len(engine.queue) for engine in engines),
            self.tokens,
            self.steps,
            self.seconds,
        )
        if chunks or force or stats != self.sent:
            self.conn.send(Chunks(chunks, stats))
            self.sent = stats

    def engines(self) -> list[Engine]:
        return [*self.draining, self.engine] if self.engine else self.draining

    def has_work(self) -> bool:
        return any(engine.has_work() for engine in self.engines())

    # ---- loading and swapping -----------------------------------------------------------------

    def prepare(self, version_id: str) -> _Prepared:
        """Reading weights and allocating a KV cache take a while: a helper thread does it."""
        version = checkpoint.load_version(self.models_dir, version_id, self.device, self.dtype)
        weights = next(version.model.parameters()).dtype
        threads = self.threads_for(weights)
        if threads:  # before the engine: its cache's layout follows the count (`kernels.supports`)
            pin_threads(threads)
        engine = Engine(
            version.model,
            version.tokenizer,
            self.max_batch,
            self.cuda_graphs,
            stop_tokens=version.stop_tokens,
        )
        loaded = LoadedVersion(
            version_id,
            version.model.cfg,
            version.profile.name,
            version.tokenizer,
            version.chat_template,
            version.stop_tokens,
            str(weights).removeprefix("torch."),
            torch.get_num_threads() if self.device.type == "cpu" else 0,  # what took effect
        )
        return engine, loaded

    def threads_for(self, weights: torch.dtype) -> int:
        """Torch threads for a version's decode: a model served in bfloat16 on the CPU is
        bound by memory bandwidth, which more threads draw more of (`Settings.decode_threads`)."""
        cpu_bf16 = self.device.type == "cpu" and weights == torch.bfloat16
        return self.bf16_threads if cpu_bf16 else self.threads

    def load(self, call_id: int, version_id: str) -> None:
        """The helper thread's part of a `Load`: the step loop adopts what it prepared."""
        try:
            outcome: _Prepared | Exception = self.prepare(version_id)
        except Exception as exc:
            outcome = _picklable(exc)
        self.hand_over(lambda: self.loaded(call_id, outcome))

    def hand_over(self, then: Callable[[], None]) -> None:
        """From a helper thread: have the step loop run `then` between two steps."""
        self.handed.append(then)
        os.write(self.wake_w, b"x")

    def take_handed(self) -> None:
        while self.handed:
            os.read(self.wake_r, 1)
            self.handed.popleft()()

    def loaded(self, call_id: int, outcome: _Prepared | Exception) -> None:
        if isinstance(outcome, Exception):
            self.conn.send(CallFailed(call_id, outcome))
        else:
            self.adopt(*outcome)
            self.conn.send(Loaded(call_id, outcome[1]))

    def adopt(self, engine: Engine, version: LoadedVersion) -> None:
        if self.engine is not None and self.engine.has_work():
            self.draining.append(self.engine)  # it finishes on the new version's threads
        self.engine, self.engine_version = engine, version.id
        if version.threads:  # this thread steps: the count is set where it runs
            pin_threads(version.threads)

    # ---- streams ------------------------------------------------------------------------------

    def submit(self, stream_id: int, prompt: str | list[int], params: SamplingParams) -> None:
        engine = self.engine
        if engine is not None and isinstance(prompt, str) and len(prompt) > TOKENIZE_APART_CHARS:
            self.tokenizing[stream_id] = engine, self.engine_version
            threading.Thread(
                target=self.tokenize, args=(stream_id, engine, prompt, params), daemon=True
            ).start()
            return
        self.enqueue(stream_id, engine, self.engine_version, prompt, params)

    def tokenize(self, stream_id: int, engine: Engine, prompt: str, params: SamplingParams) -> None:
        """A helper thread's part of a long prompt: the step loop submits the ids."""
        try:
            outcome: list[int] | Exception = encode_apart(engine.tok, prompt)
        except Exception as exc:
            outcome = _picklable(exc)
        self.hand_over(lambda: self.tokenized(stream_id, outcome, params))

    def tokenized(
        self, stream_id: int, outcome: list[int] | Exception, params: SamplingParams
    ) -> None:
        """Submit a tokenised prompt to the engine it was submitted to (a version swapped in
        meanwhile does not change it), unless it was cancelled meanwhile."""
        submitted = self.tokenizing.pop(stream_id, None)
        if submitted is None:
            return
        engine, version = submitted
        if isinstance(outcome, Exception):
            self.conn.send(StreamFailed(stream_id, outcome))
            return
        if engine not in self.engines():  # its version was swapped out meanwhile
            self.draining.append(engine)  # it drains, with this sequence
        self.enqueue(stream_id, engine, version, outcome, params)

    def enqueue(
        self,
        stream_id: int,
        engine: Engine | None,
        version: str,
        prompt: str | list[int],
        params: SamplingParams,
    ) -> None:
        try:
            if engine is None:
                raise Unavailable("the inference worker has no model loaded")
            seq = engine.submit(prompt, params)
        except Exception as exc:  # the routing names an expert the newly adopted version lacks
            self.conn.send(StreamFailed(stream_id, _picklable(exc)))
            return
        request = _Request(stream_id, seq, engine, version)
        self.requests[stream_id] = self.by_seq[id(seq)] = request

    def cancel(self, stream_id: int) -> None:
        self.tokenizing.pop(stream_id, None)
        request = self.requests.pop(stream_id, None)
        if request is not None:
            del self.by_seq[id(request.seq)]
            request.engine.cancel(request.seq)
            # a draining engine whose last stream was cancelled goes now, not at the next step
            self.draining = [e for e in self.draining if e.has_work()]

    def forget(self, request: _Request) -> None:
        del self.requests[request.stream_id], self.by_seq[id(request.seq)]

    def step(self) -> list[tuple[int, Chunk]]:
        """One decode step of every engine with work; returns its chunks, by stream id."""
        chunks: list[tuple[int, Chunk]] = []
        for engine in self.engines():
            if not engine.has_work():
                continue
            start = time.perf_counter()
            try:
                events = engine.step()
            except Exception as exc:
                log.exception("a decode step failed; failing the streams it was running")
                self.fail(engine, exc)
                continue
            self.seconds += time.perf_counter() - start
            self.tokens += len(events)
            for event in events:
                request = self.by_seq[id(event.seq)]
                if event.finish_reason == "error":  # this sequence only: the batch goes on
                    self.forget(request)
                    self.conn.send(StreamFailed(request.stream_id, RuntimeError(event.seq.error)))
                    continue
                chunk = _chunk(request, event)
                if event.finish_reason is not None:
                    self.forget(request)
                    chunk = _final(request, chunk)
                chunks.append((request.stream_id, chunk))
        self.steps += 1
        self.draining = [engine for engine in self.draining if engine.has_work()]
        return chunks

    def fail(self, engine: Engine, exc: Exception) -> None:
        """End every stream of a failed engine with the error and give its model a fresh engine
        (its cache may be half-written), so that one bad step does not wedge the server."""
        error = _picklable(exc)
        for request in list(self.requests.values()):
            if request.engine is engine:
                self.forget(request)
                self.conn.send(StreamFailed(request.stream_id, error))
        replacement = None
        if engine is self.engine:
            self.engine = Engine(
                engine.model,
                engine.tok,
                engine.max_batch,
                self.cuda_graphs,
                stop_tokens=engine.stop_tokens,
            )
            replacement = self.engine
        else:
            self.draining.remove(engine)
        # prompts still being tokenised for it join its fresh engine (same version), or fail
        for stream_id, (waiting, version) in list(self.tokenizing.items()):
            if waiting is not engine:
                continue
            if replacement is not None:
                self.tokenizing[stream_id] = replacement, version
            else:
                del self.tokenizing[stream_id]
                self.conn.send(StreamFailed(stream_id, error))

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

    def shutdown(self) -> None:
        """End every stream as cancelled, with its summary, and drop the engines."""
        chunks: list[tuple[int, Chunk]] = []
        for request in self.requests.values():
            request.engine.cancel(request.seq)
            chunks.append((request.stream_id, _final(request, Chunk("", (), request.version_id))))
        self.requests.clear()
        self.by_seq.clear()
        for stream_id in self.tokenizing:
            self.conn.send(StreamFailed(stream_id, Unavailable("the inference server stopped")))
        self.tokenizing.clear()
        self.engine, self.draining = None, []
        self.publish(chunks, force=True)


def _chunk(request: _Request, event: TokenEvent) -> Chunk:
    """What one step added to a stream; the first also carries the scored prompt, if asked."""
    chunk = Chunk(
        event.text,
        () if event.token_id is None else (event.token_id,),
        request.version_id,
        logprobs=() if event.logprob is None else (event.logprob,),
    )
    if not request.started:
        request.started = True
        seq = request.seq
        if seq.params.prompt_logprobs:
            chunk = dataclasses.replace(
                chunk, prompt=tuple(seq.prompt_ids), prompt_logprobs=tuple(seq.prompt_logprobs)
            )
    return chunk


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
