"""Generation: sampling, stop strings, streamed text, and a batch engine for continuous batching.

`Engine` owns a model and a static KV cache with `max_batch` slots. `submit` queues a request;
each `step` admits queued requests (prefill, which yields their first token) and advances every
other active sequence by one token (one batched decode). Finished sequences free their slot at
once, so a server can call `step` in a loop and new requests join between steps.

On a CUDA device the decode step is replayed from CUDA graphs (`DecodeGraphs`): a small model's
step is many tiny kernels, and launching them one by one from Python, not the GPU's arithmetic,
is what bounds it.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from torch import Tensor

from shiftable_lib import kernels
from shiftable_lib.cache import KVCache, fuses
from shiftable_lib.model import ShiftableLM
from shiftable_lib.routing import RouteTable
from shiftable_lib.sampling import SamplingParams
from shiftable_lib.tokenizer import StreamDecoder, encode, separator_id, stop_ids

FINISH_REASONS = ("length", "stop", "eos", "cancelled", "error")
log = logging.getLogger("sma.generate")
GREEDY_BELOW = torch.finfo(torch.float32).tiny  # a smaller temperature is 0 in float32
# a longer prompt is prefilled this many tokens per step, so that the streams decoding beside it
# wait for a chunk at a time, never for the whole prompt (docs/reliability.md)
PREFILL_CHUNK = 256
# one CUDA graph capture at a time per process: torch captures on one shared side stream, and
# the inference worker may build engines in several threads (a hot swap, a failed step)
_CAPTURE_LOCK = threading.Lock()
# The shortest attention span a decode graph is captured for; longer ones double up to the
# context (docs/benchmarks.md has what reading only the cached part of the context saves).
MIN_SPAN = 128


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the model, and the most likely alternatives there
    (token id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Sequence:
    """One request's state while it generates."""

    id: int
    prompt_ids: list[int]
    truncated: int  # prompt tokens dropped from the left to fit the context
    params: SamplingParams
    generator: torch.Generator
    decoder: StreamDecoder
    routing_row: tuple[list[bool], int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # completion text emitted so far
    pending: str = ""  # decoded but held back: it might begin a stop string
    finish_reason: str | None = None
    error: str = ""  # why it ended, when finish_reason is "error" (its batch goes on)
    gate_total: Tensor | None = None  # (L, E) gate weights summed over generating positions
    prefilled: int = 0  # prompt tokens in the cache so far, while prefilled a chunk per step
    # per prompt token, its log-probability given the ones before it (None for the first),
    # when the request scores its prompt; complete once the prompt is in the cache
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)

    @property
    def gate_mean(self) -> Tensor | None:
        """Mean gate weight per layer and expert over the positions that produced the output
        (known once the sequence has finished)."""
        if self.gate_total is None or not self.output_ids:
            return None
        return self.gate_total / len(self.output_ids)

    @property
    def cached(self) -> int:
        """Tokens of this sequence in the KV cache (the newest output token is not, yet)."""
        return len(self.prompt_ids) + max(0, len(self.output_ids) - 1)


@dataclass(frozen=True)
class TokenEvent:
    """What one step produced for one sequence: its new token and the text it completes."""

    seq: Sequence
    token_id: int | None  # None when a sequence ends without one (scored its prompt only)
    text: str
    finish_reason: str | None
    logprob: Logprob | None = None  # when the request asks for log-probabilities


@dataclass
class Launched:
    """A decode step on its way: its sequences (the batch's rows, in slot order, when it was
    launched), its sampled tokens on the device and their copy on the way to the host, and
    (for a step launched ahead) its gate weights, counted once its tokens are taken."""

    seqs: list[Sequence]
    tokens: Tensor
    host: Tensor
    ready: torch.cuda.Event | None  # recorded after the copy to the host (on a GPU)
    gates: Tensor | None = None


def sample(logits: Tensor, seqs: list[Sequence]) -> list[int | None]:
    """One token per row, each row with its own temperature, top-k, top-p and generator; None
    for a row that cannot be sampled (its logits are not finite), which ends that sequence
    only (`sample_on_device`, read back)."""
    return [None if t < 0 else t for t in sample_on_device(logits, seqs).tolist()]


def sample_on_device(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    """`sample`'s tokens as a tensor on the logits' device, -1 for a row that cannot be sampled.
    Nothing is read back from the device, so a caller may launch more work before it reads them.

    Each row is shifted to a maximum of 0 before it is divided by the temperature, so any
    temperature the API admits, however close to 0, gives probabilities and never inf or NaN:
    the top logit keeps weight 1 and the rest underflow to 0, as in greedy decoding (and a
    temperature too small for float32, which would be 0 there, is greedy)."""
    rows = logits.float()
    # max propagates NaN, and is inf when any score is: one reduction finds the greedy token
    # and whether the row is fit to sample
    top, best = rows.max(-1)
    fit = torch.isfinite(top)
    picked = torch.where(fit, best, -1)
    for i, s in enumerate(seqs):
        p = s.params
        if p.temperature < GREEDY_BELOW:
            continue
        # an unfit row samples from zeros (any token), and reads -1 all the same
        row = torch.where(fit[i], (rows[i] - top[i]) / p.temperature, 0.0)
        index = None
        if p.top_k or p.top_p < 1:
            row, index = row.sort(descending=True)
            if p.top_k:
                row[p.top_k :] = float("-inf")
            if p.top_p < 1:  # keep the smallest set reaching p
                cum = row.softmax(-1).cumsum(-1)
                row[1:].masked_fill_(cum[:-1] >= p.top_p, float("-inf"))
        choice = torch.multinomial(row.softmax(-1), 1, generator=s.generator)[0]
        picked[i] = torch.where(fit[i], choice if index is None else index[choice], -1)
    return picked


def logprobs_of(logits: Tensor, targets: list[int], top: list[int]) -> list[Logprob]:
    """Per row of `logits` (n, V): the log-probability of `targets[i]` and the `top[i]` most
    likely tokens', in one transfer from the device."""
    logp = logits.float().log_softmax(-1)
    index = torch.tensor(targets, device=logits.device).unsqueeze(-1)
    chosen = logp.gather(-1, index).squeeze(-1).tolist()
    k = max(top, default=0)
    values, ids = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [
        Logprob(t, c, tuple(zip(ids[i][: top[i]], values[i][: top[i]], strict=True)))
        for i, (t, c) in enumerate(zip(targets, chosen, strict=True))
    ]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class DecodeGraphs:
    """`ShiftableLM.decode` captured as CUDA graphs, one per batch-size bucket and attention
    span, and replayed.

    A graph replays fixed shapes and fixed memory, so each graph decodes `bucket` rows over
    the first `span` cached positions (positions past a row's length are masked, as in eager
    decoding), from a static token buffer into static outputs (the captured routing reads no
    per-row routing tensors, so those need no buffers). A batch of n rows whose longest row
    holds p tokens runs the smallest bucket >= n and the smallest span > p: attention over the
    whole context would cost a short sequence as much as a full one, and with one query per
    row it is the largest part of a small model's step. The rows past n are free cache slots,
    reset to position 0 first, so they decode a throw-away token there (a slot is prefilled
    afresh before it is used again). A bucket whose step runs the fused kernels (`fused.py`)
    has one graph, not one per span: their attention reads each row's own length.

    Only the routing that almost every request uses is captured: every expert allowed, soft
    mixing (for the generalist, its one expert). Forcing, excluding or top-k requests in a
    batch send that step down the eager path. Graphs are captured when the engine is made,
    while every slot is free, so the warm-up runs needed before a capture touch no sequence.

    The graphs hold the addresses of the model's weights (and of the experts' joined weights,
    which they keep alive): an engine serves one model whose weights do not change, and a new
    version gets a new engine.
    """

    def __init__(self, model: ShiftableLM, cache: KVCache, max_batch: int) -> None:
        self.cache = cache
        device, E = model.wte.weight.device, len(model.experts)
        self.buckets = _doublings(1, max_batch)
        self.spans = _doublings(min(MIN_SPAN, cache.context), cache.context)
        # per bucket, the spans it has a graph for: every one of `spans`, or only the whole
        # context where the fused kernels serve, as they read each row's own length
        self.captured: dict[int, list[int]] = {}
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self.single: int | None = None  # the captured routing's one expert, if it has one
        self.replays = 0
        with _CAPTURE_LOCK:
            self._capture(model, device, E)
        # the joined expert weights the graphs read, kept alive even if the model's cache of
        # them is replaced
        self.joined = [list(block.attn._joined.values()) for block in model.blocks]
        cache.reset()  # the warm-ups wrote into free slots; start clean anyway

    def _capture(self, model: ShiftableLM, device: torch.device, E: int) -> None:
        cache = self.cache
        pool = torch.cuda.graph_pool_handle()
        warm = 2  # the first runs initialise lazily (cuBLAS handles, workspaces)
        # largest first: the smaller reuse their memory
        for bucket in reversed(self.buckets):
            routes = RouteTable.from_rows([[True] * E] * bucket, [0] * bucket, device)
            tokens = self.tokens[:bucket]
            self.captured[bucket] = [cache.context] if fuses(cache, tokens) else self.spans
            for span in reversed(self.captured[bucket]):
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(warm):  # and each shape's attention plan
                        model.decode(cache, tokens, routes, span)
                torch.cuda.current_stream(device).wait_stream(side)
                warm = 1
                graph = torch.cuda.CUDAGraph()
                # thread_local: the inference worker captures a new version's graphs in a
                # helper thread while its step thread keeps decoding the old one
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    logits, gates = model.decode(cache, tokens, routes, span)
                self.graphs[bucket, span] = (graph, logits, gates)
            self.single = routes.single

    def serves(self, routes: RouteTable) -> bool:
        """Whether a batch with these routes can replay a graph (else decode eagerly)."""
        return routes.single == self.single and not routes.any_topk and routes.block is None

    def decode(self, tokens: Tensor, span: int) -> tuple[Tensor, Tensor]:
        """What `ShiftableLM.decode` returns for slots 0..n-1 (n = len(tokens)) whose longest
        cached length is below `span`, by replay. The outputs are views of the graph's
        buffers: use them before the next call."""
        n = tokens.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        span = next(s for s in self.captured[bucket] if s >= span)
        self.tokens[:n].copy_(tokens)
        self.cache.lengths[n:bucket].zero_()
        graph, logits, gates = self.graphs[bucket, span]
        graph.replay()
        self.replays += 1
        return logits[:n], gates[:, :n]


def _doublings(first: int, last: int) -> list[int]:
    """first, 2 first, 4 first, ... up to and including `last`."""
    sizes = [first]
    while sizes[-1] < last:
        sizes.append(min(2 * sizes[-1], last))
    return sizes


class Engine:
    """Continuous batching over a static KV cache: requests join and leave between steps."""

    def __init__(
        self,
        model: ShiftableLM,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        cuda_graphs: bool = True,
        prefill_chunk: int = PREFILL_CHUNK,
        stop_tokens: tuple[str, ...] = (),
        look_ahead: bool | None = None,
    ) -> None:
        self.model = model.eval()
        self.prefill_chunk = prefill_chunk
        self.tok = tokenizer
        self.stop_tokens = stop_tokens  # the version's own; () = our EOS
        self.stops = stop_ids(tokenizer, stop_tokens)
        self.eos = separator_id(tokenizer, stop_tokens)
        self.device = model.wte.weight.device
        # launch each decode step before reading the last one's tokens (on a GPU by default:
        # elsewhere the step runs in the calling thread, and nothing would overlap)
        self.look_ahead = self.device.type == "cuda" if look_ahead is None else look_ahead
        self._ahead: Launched | None = None
        self.steps_ahead = 0  # decode steps launched before the last one's tokens were read
        self.cache = model.new_cache(max_batch)
        if self.cache.position_major:
            kernels.warm_up()  # compile the CPU decode attention before the first request
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            try:
                with torch.inference_mode():
                    self.graphs = DecodeGraphs(model, self.cache, max_batch)
            except Exception:  # only a speed-up: decode eagerly rather than not at all
                log.exception("capturing CUDA graphs of the decode step failed; decoding eagerly")
                self.cache.reset()
        cfg = model.cfg
        # per slot, gate weights summed over the output so far; read once, when a sequence ends
        self.gate_sums = torch.zeros(max_batch, cfg.n_layer, len(model.experts), device=self.device)
        self.active: list[Sequence] = []  # active[i] lives in cache slot i
        # a long prompt prefilled a chunk per step, in the slot after the active ones: it joins
        # them (and decodes) once its whole prompt is in the cache
        self.filling: Sequence | None = None
        self.queue: deque[Sequence] = deque()
        self._ids = itertools.count()
        self._routes: RouteTable | None = None

    @property
    def max_batch(self) -> int:
        return self.cache.slots

    def submit(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Queue a request (text or token ids); bad parameters raise before anything is queued."""
        context = self.model.cfg.context
        params.validate(context)
        allowed = params.routing.allowed(self.model.experts)
        ids, truncated = self.prompt_ids(prompt, context - params.max_new_tokens)
        if truncated and not params.truncate:
            raise ValueError(
                f"the prompt has {len(ids) + truncated} tokens and max_new_tokens is "
                f"{params.max_new_tokens}: together more than the model's context of {context}"
            )
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        seq = Sequence(
            id=next(self._ids),
            prompt_ids=ids,
            truncated=truncated,
            params=params,
            generator=torch.Generator(device=self.device).manual_seed(seed),
            decoder=StreamDecoder(self.tok),
            routing_row=(allowed, params.routing.top_k()),
        )
        self.queue.append(seq)
        return seq

    def prompt_ids(self, prompt: str | list[int], room: int) -> tuple[list[int], int]:
        """A prompt as at most `room` token ids (left-truncated), and how many were dropped."""
        ids = encode(self.tok, prompt) if isinstance(prompt, str) else list(prompt)
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        ids = ids or [self.eos]  # an empty prompt starts a new document
        truncated = max(0, len(ids) - room)
        return ids[truncated:], truncated

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now; its slot is free for the next step."""
        if seq in self.queue:
            self.queue.remove(seq)
        if seq is self.filling:
            self.filling = None  # its slot is free again: nothing reads what it cached
        seq.finish_reason = seq.finish_reason or "cancelled"
        if seq in self.active:
            self._release(self.active.index(seq))

    def has_work(self) -> bool:
        return bool(self.active or self.queue or self.filling)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit what fits, advance every active sequence by one token, retire finished ones."""
        events: list[TokenEvent] = []
        running = len(self.active)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and any(s.finish_reason is None for s in ahead.seqs):
            events += self._take(ahead)  # launched in the last step, before its host work
        elif running:
            seqs = self.active[:running]
            span = max(s.cached for s in seqs) + 1
            logits, gates = self._decode(self._last_tokens(), span)
            self.gate_sums[:running] += gates.transpose(0, 1).float()
            if self._may_look_ahead():
                events += self._take(self._launch(seqs, logits))
            else:
                events += self._emit(seqs, logits)
        admitted = self._admit()
        if admitted:
            first = len(self.active) - len(admitted)
            logits, gates = self._prefill(admitted)
            self.gate_sums[first : first + len(admitted)] = gates.transpose(0, 1).float()
            events += self._emit(admitted, logits)
        if self.filling is not None:
            events += self._fill()
        for i in reversed(range(len(self.active))):
            if self.active[i].finish_reason is not None:
                self._release(i)
        return events

    # ---- internals ----------------------------------------------------------------------------

    def _decode(self, tokens: Tensor, span: int) -> tuple[Tensor, Tensor]:
        """One decode step of the active rows, replayed from a graph where one serves."""
        routes = self._route_table()
        # a graph's padding rows write into the slots past the batch: the filling one's
        if self.graphs is not None and self.filling is None and self.graphs.serves(routes):
            return self.graphs.decode(tokens, span)
        return self.model.decode(self.cache, tokens, routes, span)

    def _may_look_ahead(self) -> bool:
        """Whether the next decode step may be launched before this one's tokens are read: the
        batch will be the same unless a sequence ends on a token the host has yet to read (an
        EOS, a stop string: that row's step ahead is then thrown away). Not when a queued
        request would join, a sequence's length ends it, or its log-probabilities are asked
        (they read this step's logits, which the next step overwrites)."""
        return (
            self.look_ahead
            and self.filling is None
            and not (self.queue and len(self.active) < self.max_batch)
            and all(
                s.finish_reason is None
                and s.params.logprobs is None
                and len(s.output_ids) + 2 <= s.params.max_new_tokens
                for s in self.active
            )
        )

    def _launch(
        self, seqs: list[Sequence], logits: Tensor, gates: Tensor | None = None
    ) -> Launched:
        """Sample a step's tokens on the device and start their copy to the host."""
        tokens = sample_on_device(logits, seqs)
        if self.device.type != "cuda":
            return Launched(seqs, tokens, tokens, None, gates)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Launched(seqs, tokens, host, ready, gates)

    def _take(self, launched: Launched) -> list[TokenEvent]:
        """Advance a launched step's sequences by its tokens. First, where the batch is still
        the one it was launched for, launch the next step from its tokens on the device, so
        that the GPU decodes that one while the host reads and detokenises these."""
        seqs = launched.seqs
        same = len(seqs) == len(self.active) and all(map(operator.is_, seqs, self.active))
        if same and self._may_look_ahead():
            # the step writes these tokens one position past the cached ones
            span = max(s.cached for s in seqs) + 2
            # a row that could not be sampled (-1) decodes token 0, and is thrown away
            logits, gates = self._decode(launched.tokens.clamp(min=0), span)
            self._ahead = self._launch(seqs, logits, gates.clone())
            self.steps_ahead += 1
        if launched.gates is not None:
            self._count_gates(launched)
        if launched.ready is not None:
            launched.ready.synchronize()
        events = []
        for seq, token in zip(seqs, launched.host.tolist(), strict=True):
            if seq.finish_reason is not None:  # it ended after this step was launched
                continue
            events.append(self._fail(seq) if token < 0 else self._advance(seq, token))
        return events

    def _count_gates(self, launched: Launched) -> None:
        """Add a step's gate weights to the sums of the sequences that are still running (in
        the slots they hold now)."""
        assert launched.gates is not None
        gates = launched.gates.transpose(0, 1).float()  # (n, L, E)
        slot = {id(s): i for i, s in enumerate(self.active)}
        pairs = [
            (slot[id(s)], j)
            for j, s in enumerate(launched.seqs)
            if s.finish_reason is None and id(s) in slot
        ]
        if pairs == [(j, j) for j in range(len(launched.seqs))]:
            self.gate_sums[: len(pairs)] += gates
        elif pairs:
            to, of = (torch.tensor(c, device=self.device) for c in zip(*pairs, strict=True))
            self.gate_sums[to] += gates[of]

    def _admit(self) -> list[Sequence]:
        """Queued sequences into free slots: a prompt of up to `prefill_chunk` tokens joins the
        batch at once; a longer one becomes the filling sequence (one at a time)."""
        admitted = []
        while self.queue and self.filling is None and len(self.active) < self.max_batch:
            seq = self.queue.popleft()
            if len(seq.prompt_ids) > self.prefill_chunk:
                self.filling = seq
            else:
                self.active.append(seq)
                admitted.append(seq)
        if admitted:
            self._routes = None
        return admitted

    def _fill(self) -> list[TokenEvent]:
        """Prefill the next chunk of the filling sequence; once its prompt is all in the cache,
        it joins the batch with its first token."""
        seq, slot = self.filling, len(self.active)
        assert seq is not None
        start = seq.prefilled
        chunk = seq.prompt_ids[start : start + self.prefill_chunk]
        logits, gates, every = self.model.prefill(
            self.cache,
            torch.tensor([slot], device=self.device),
            torch.tensor([chunk], device=self.device),
            torch.tensor([len(chunk)], device=self.device),
            self._rows([seq]),
            start,
            every=seq.params.prompt_logprobs,
        )
        if every is not None:
            self._score_prompt(seq, every[0], start)
        seq.prefilled += len(chunk)
        if seq.prefilled < len(seq.prompt_ids):
            return []
        self.filling = None
        self.active.append(seq)
        self._routes = None
        self.gate_sums[slot] = gates[:, 0].float()
        return self._emit([seq], logits)

    def _prefill(self, seqs: list[Sequence]) -> tuple[Tensor, Tensor]:
        first = len(self.active) - len(seqs)
        lengths = torch.tensor([len(s.prompt_ids) for s in seqs], device=self.device)
        idx = torch.full((len(seqs), int(lengths.max())), self.eos, device=self.device)
        for i, s in enumerate(seqs):
            idx[i, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
        slots = torch.arange(first, first + len(seqs), device=self.device)
        scored = any(s.params.prompt_logprobs for s in seqs)
        logits, gates, every = self.model.prefill(
            self.cache, slots, idx, lengths, self._rows(seqs), every=scored
        )
        if every is not None:
            for i, s in enumerate(seqs):
                if s.params.prompt_logprobs:
                    self._score_prompt(s, every[i, : len(s.prompt_ids)], 0)
        return logits, gates

    def _score_prompt(self, seq: Sequence, logits: Tensor, start: int) -> None:
        """Record the log-probabilities of the prompt tokens that `logits` (T, V), the scores
        at prompt positions `start`.., predict: position p predicts token p + 1."""
        if start == 0:
            seq.prompt_logprobs.append(None)  # the first token has nothing before it
        ids = seq.prompt_ids
        n = min(len(logits), len(ids) - 1 - start)  # the last position predicts the output
        if n > 0:
            k = seq.params.logprobs or 0
            seq.prompt_logprobs += logprobs_of(logits[:n], ids[start + 1 : start + 1 + n], [k] * n)

    def _rows(self, seqs: list[Sequence]) -> RouteTable:
        return RouteTable.from_rows(
            [s.routing_row[0] for s in seqs], [s.routing_row[1] for s in seqs], self.device
        )

    def _route_table(self) -> RouteTable:
        if self._routes is None or self._routes.allowed.shape[0] != len(self.active):
            self._routes = self._rows(self.active)
        return self._routes

    def _last_tokens(self) -> Tensor:
        return torch.tensor([s.output_ids[-1] for s in self.active], device=self.device)

    def _emit(self, seqs: list[Sequence], logits: Tensor) -> list[TokenEvent]:
        tokens = sample(logits, seqs)
        scores: list[Logprob | None] = [None] * len(seqs)
        asked = [
            i
            for i, (s, t) in enumerate(zip(seqs, tokens, strict=True))
            if s.params.logprobs is not None and t is not None and s.params.max_new_tokens
        ]
        if asked:
            found = logprobs_of(
                logits[asked], [tokens[i] for i in asked], [seqs[i].params.logprobs for i in asked]
            )
            for i, score in zip(asked, found, strict=True):
                scores[i] = score
        events = []
        for seq, token, score in zip(seqs, tokens, scores, strict=True):
            if not seq.params.max_new_tokens:  # it scored its prompt, and asks for no more
                seq.finish_reason = "length"
                events.append(TokenEvent(seq, None, "", "length"))
            elif token is None:
                events.append(self._fail(seq))
            else:
                events.append(self._advance(seq, token, score))
        return events

    def _fail(self, seq: Sequence) -> TokenEvent:
        """End one sequence whose step went wrong; the rest of the batch goes on."""
        seq.finish_reason = "error"
        seq.error = "the model produced non-finite scores for this sequence"
        log.error("sequence %d ended: %s", seq.id, seq.error)
        return TokenEvent(seq, -1, "", "error")

    def _advance(self, seq: Sequence, token: int, score: Logprob | None = None) -> TokenEvent:
        """Record one token, decide whether the sequence is done, and say what text it adds."""
        seq.output_ids.append(token)
        stops = seq.params.stop
        if token in self.stops and not seq.params.ignore_eos:
            seq.finish_reason = "eos"
        else:
            seq.pending += seq.decoder.push(token)
        if stops:
            hit = min((p for p in (seq.pending.find(s) for s in stops) if p >= 0), default=-1)
            if hit >= 0:
                seq.pending = seq.pending[:hit]
                seq.finish_reason = "stop"
        if seq.finish_reason is None and len(seq.output_ids) >= seq.params.max_new_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason in ("length", "eos"):
            seq.pending += seq.decoder.flush()
        keep = _held_back(seq.pending, stops) if seq.finish_reason is None else 0
        delta = seq.pending[: len(seq.pending) - keep]
        seq.pending = seq.pending[len(delta) :]
        seq.text += delta
        return TokenEvent(seq, token, delta, seq.finish_reason, score)

    def _release(self, i: int) -> None:
        self.active[i].gate_total = self.gate_sums[i].cpu()
        last = len(self.active) - 1
        if i != last:
            self.cache.move(last, i)
            self.gate_sums[i] = self.gate_sums[last]
            self.active[i] = self.active[last]
        self.active.pop()
        if self.filling is not None:  # it stays in the slot right after the active ones
            self.cache.move(last + 1, last)
        self._routes = None


def stream(engine: Engine, prompt: str, params: SamplingParams) -> Iterator[TokenEvent]:
    """Generate one completion, yielding each step's event (drives the engine itself)."""
    seq = engine.submit(prompt, params)
    while seq.finish_reason is None:
        for event in engine.step():
            if event.seq is seq:
                yield event


def complete(engine: Engine, prompts: list[str], params: SamplingParams) -> list[Sequence]:
    """Run several prompts to completion together; returns their finished sequences."""
    seqs = [engine.submit(p, params) for p in prompts]
    while any(s.finish_reason is None for s in seqs):
        engine.step()
    return seqs
