"""Token-level continuous batching for the API server (`serve --batching continuous`, the default).

    scheduler = Scheduler(assistant, max_batch=64)
    scheduler.submit(Job(turns, images, settings, on_event))   # from any thread; events come from the worker

One worker thread owns a `SlotDecoder` (a static KV cache of `max_batch` slots, CUDA graphs on CUDA) and loops:
drop the rows of clients that went away (their slots free at once); admit the waiting requests that have free slots,
all at once (one template + image-encoding pass for all of them); prefill admitted prompts, at most `prefill_chunk`
prompt tokens per iteration, the prompts that fit together in one forward pass (a prompt longer than the chunk alone,
split over iterations); then one decode step for every slot in use. A request therefore joins the running batch at
the next step boundary and leaves it when it stops, and while newcomers are prefilled the others lose at most one
chunk's time (plus one admission's image encoding) between two tokens.

Greedy requests with one answer each (the common case) get their first tokens from one argmax over the prefill
pass's logits, written into the decoder's input on the GPU and read by the host once. Rows that end give their slots
back at once; the slots' device state (live flag, position) is reset for all of them in one write before the next
step or admission. The host never reads a GPU tensor where it can count on its own copy (prompt lengths, image
placeholders): such a read waits for all queued work while holding the interpreter lock.

When every row in the step decodes greedily, the step's tokens are chosen on the GPU and written
back into the decoder's input there, and steps are pipelined: step k+1 is queued on the device before the host reads
and streams step k's tokens (waiting for them without the interpreter lock), so the host's work per token (text,
stop strings, events, the HTTP stream) overlaps the device's. A row that ends at step k was already given step k+1;
that token is dropped, and its slot is freed after it in the device's order. One column of each slot is spare for it.

Each row samples on its own after the step, through transformers' logits processors (repetition penalty,
temperature, top-k, top-p, in `generate`'s order) and `torch.multinomial`, with a `torch.Generator` per seeded
request, so a seed gives the same answer alone or in any batch (on CPU the same tokens as `generate` after
`torch.manual_seed`); rows that share settings and need no generator of their own are sampled together. Streaming, stop strings and max_tokens are
the static batcher's own row logic (`batcher._Row.advance`).

Failures stay with their request: a conversation the template or image preprocessing rejects, a prefill or a
row's sampling that raises, fail that request only; a decode step that raises fails the rows in it (a step is one
forward pass over all of them) and the scheduler goes on with the next requests.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .args import PREFILL_CHUNK
from .batcher import Failure, Job, Worker, _Row
from .generate import Assistant, GenerationSettings
from .slots import SlotDecoder
from .vision_graphs import GraphedTower

log = logging.getLogger(__name__)

PHASES = ("admit", "prefill", "launch", "wait", "stream", "sampled")
"""Where the worker thread's time goes (`Scheduler.seconds`): admitting requests (template, images, vision tower,
embeddings), prefilling prompts (and choosing first tokens), queueing greedy steps, waiting for a queued step's
tokens (the device's share), streaming them (text, stop strings, events), and synchronous sampled steps."""

KV_MEMORY_SHARE = 0.6
"""Share of the GPU memory free at start that the slots' KV cache may take (the rest: activations, graphs, logits)."""


def processors(s: GenerationSettings) -> LogitsProcessorList:
    """The logits processors `generate` builds for these settings, in its order."""
    out = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.do_sample:
        if s.temperature != 1.0:
            out.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            out.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            out.append(TopPLogitsWarper(s.top_p))
    return out


def _read(t: torch.Tensor) -> list[int]:
    """A small device tensor's values: copied to pinned memory and waited for through an event, which (unlike
    `.tolist()` on the device tensor) lets the HTTP side's threads run while the device finishes."""
    if not t.is_cuda:
        return t.tolist()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host.tolist()


def slot_len(assistant: Assistant, slots: int, wanted: int) -> int:
    """Cache columns per slot: `wanted`, less where the KV cache of all slots would not fit the GPU's free memory."""
    cfg = assistant.model.llm.config
    device = assistant.model.device
    if device.type != "cuda":
        return wanted
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * assistant.model.llm.dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free * KV_MEMORY_SHARE) // (per_token * slots) // 16 * 16
    if fits < wanted:
        log.warning("KV cache: %d slots x %d positions fit in %.0f%% of free GPU memory (asked %d); longer requests "
                    "are refused", slots, fits, 100 * KV_MEMORY_SHARE, wanted)
    return max(16, min(wanted, fits))


@dataclass(eq=False)
class _Request:
    """A job being prefilled or decoded: its rows, their slots, and what they share (prompt, generator)."""

    job: Job
    rows: list[_Row]
    slots: list[int]
    embeds: torch.Tensor | None = None
    """The prompt's input embeddings (1, T, d) until it is prefilled."""
    prefilled: int = 0
    generator: torch.Generator | None = None
    procs: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    failed: bool = False

    @property
    def greedy(self) -> bool:
        """Its next token is the argmax of the logits: chosen on the device, with the other greedy rows."""
        s = self.job.settings
        return not s.do_sample and s.repetition_penalty == 1.0 and not self.failed


@dataclass(eq=False)
class _Step:
    """A greedy decode step queued on the device whose tokens the host has not read yet."""

    rows: dict[int, _Active]
    """slot -> the row it decoded for (a slot freed and reused since then is not that row any more)."""
    tokens: torch.Tensor
    """The step's tokens per slot, copied to (pinned) host memory once `ready`."""
    ready: torch.cuda.Event | None


@dataclass
class _Active:
    """A row decoding in a slot and its position (the cache column it fills next). The token it is fed lives in the
    decoder's input buffer on the device (written there by `_start`, `_launch` or `_sampled_step`)."""

    row: _Row
    request: _Request
    pos: int


class Scheduler(Worker):
    """Continuous batching over `max_batch` slots; the same `submit`/`close` interface as `batcher.Batcher`."""

    thread_name = "scheduler"

    def __init__(self, assistant: Assistant, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, graph_vision: bool = False) -> None:
        super().__init__()
        self.assistant = assistant
        self.max_batch = max(1, max_batch)
        context = int(getattr(assistant.model.llm.config, "max_position_embeddings", 0) or 1 << 30)
        self.max_len = slot_len(assistant, self.max_batch, min(context, max_len or assistant.max_txt_len + 2048))
        self.prefill_chunk = max(1, prefill_chunk)
        self._waiting: deque[Job] = deque()
        self._ready: deque[_Request] = deque()  # admitted (slots taken, prompt embedded), waiting for prefill
        self._prefill: _Request | None = None  # a prompt longer than one chunk, being prefilled over iterations
        self._active: dict[int, _Active] = {}
        self._inflight: _Step | None = None  # the greedy step queued on the device, not yet read
        self._host_tokens: list[torch.Tensor] = []  # two pinned buffers: one step written while the other is read
        self._free = list(range(self.max_batch))  # a heap: the lowest free slot first keeps decode steps narrow
        self._idle: list[int] = []  # slots freed whose device state (live, position) is not reset yet
        self._closing = False
        self.decoder: SlotDecoder | None = None
        self.graph_vision = graph_vision
        self.tower: GraphedTower | None = None
        """The vision tower + Q-Former as captured graphs for admissions (`graph_vision`, CUDA only)."""
        self.steps = 0
        """Decode steps run (each gives every slot in use one token)."""
        self.rows_run = 0
        """Rows that ended: finished, failed or cancelled."""
        self.most_rows = 0
        """Most rows decoded in one step."""
        self.seconds = dict.fromkeys(PHASES, 0.0)
        """Host wall time of the worker thread by phase, summed since start (no device syncs added; see PHASES)."""

    @contextlib.contextmanager
    def _timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    @property
    def slots_in_use(self) -> int:
        return self.max_batch - len(self._free)

    # ------------------------------------------------------------------ worker

    def _busy(self) -> bool:
        return bool(self._waiting or self._ready or self._prefill or self._active or self._inflight)

    def _take_new(self) -> None:
        """Move submitted jobs to the waiting line; block for one only when there is nothing else to do."""
        block = not self._busy() and not self._closing
        while True:
            try:
                job = self._pending.get() if block else self._pending.get_nowait()
            except queue.Empty:
                return
            block = False
            if job is None:
                self._closing = True  # finish what was submitted, then stop
            else:
                self._waiting.append(job)

    def _start_decoder(self) -> None:
        """The slot decoder and all its CUDA graphs, before the first request (see SlotDecoder.capture_all)."""
        device = self.assistant.model.device
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this thread's captures and syncs happen on the model's GPU
        with self.assistant.lock:
            # one column spare per slot: the pipelined step after a row's last token writes there (module doc)
            self.decoder = SlotDecoder(self.assistant.model.llm, self.max_batch, self.max_len + 1, fuse=True,
                                       compile=self.assistant.compile_decoder)
            pinned = device.type == "cuda"
            self._host_tokens = [torch.zeros(self.max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
            start = time.perf_counter()
            n = self.decoder.capture_all()
            if self.graph_vision and pinned:
                self.tower = GraphedTower(self.assistant.model, self.max_batch, self.assistant.processor.size)
                towers = self.tower.capture_all()
        if n:
            log.info("continuous batching: %d decode graphs captured in %.1f s (%d slots x %d positions)", n,
                     time.perf_counter() - start, self.max_batch, self.max_len)
        if self.tower is not None:
            log.info("continuous batching: vision tower + Q-Former captured for %d batch sizes (up to %d images)",
                     towers, self.max_batch)

    def _work(self) -> None:
        try:
            with torch.inference_mode():
                self._start_decoder()
        except Exception as exc:  # e.g. out of memory for the KV cache: every request gets this error
            log.exception("continuous batching could not start")
            self._broken(exc)
            return
        while True:
            self._take_new()
            if self._closing and not self._busy():
                return
            with torch.inference_mode():  # the decoder's buffers are inference tensors: every write in this mode
                try:
                    with self.assistant.lock:
                        self._iteration()
                except Exception as exc:  # a bug in the loop itself: fail what is running, keep serving
                    log.exception("scheduler iteration failed")
                    try:
                        self._fail_all(exc)
                    except Exception:  # the device itself is broken: fail everyone, now and later, and stop
                        log.exception("the scheduler cannot recover; failing every request")
                        self._broken(exc)
                        return

    def _broken(self, exc: BaseException) -> None:
        """No GPU work is possible any more: every request still running, waiting or still to come gets a Failure,
        without touching the device, so that no client waits for a stream that cannot come."""
        for req in [a.request for a in self._active.values()] + list(self._ready) + \
                ([self._prefill] if self._prefill else []):
            if not req.failed:  # a request's rows share one _Request: it fails once
                req.failed = True
                req.job.on_event(Failure(exc))
        self._active.clear()
        self._inflight = None
        self._ready.clear()
        self._prefill = None
        while True:
            while self._waiting:
                self._waiting.popleft().on_event(Failure(exc))
            if self._closing:
                return
            self._take_new()  # nothing is busy now: blocks for the next job (or close)

    def _fail_all(self, exc: BaseException, prefill: bool = True) -> None:
        """Fail the decoding requests, and (`prefill`) those admitted but not yet decoding."""
        for req in {id(a.request): a.request for a in self._active.values()}.values():
            self._fail(req, exc)
        if prefill:
            waiting = list(self._ready) + ([self._prefill] if self._prefill is not None else [])
            self._ready.clear()
            self._prefill = None
            for req in waiting:
                self._fail(req, exc)

    def _iteration(self) -> None:
        self._drop_cancelled()
        budget = self.prefill_chunk
        while budget > 0:
            if self._prefill is not None:
                with self._timed("prefill"):
                    budget -= self._prefill_chunk(self._prefill, budget)
                continue
            if not self._ready:
                with self._timed("admit"):
                    self._admit()
                if not self._ready:
                    break
            group = []
            while self._ready and sum(r.embeds.shape[1] for r in group) + self._ready[0].embeds.shape[1] <= budget:
                group.append(self._ready.popleft())
            if not group:  # the next prompt is longer than what is left of the budget: in chunks, alone
                self._prefill = self._ready.popleft()
                continue
            with self._timed("prefill"):
                budget -= self._prefill_group(group)
        if self._active or self._inflight:
            self._decode_step()

    # ------------------------------------------------------------------ joining

    def _admit(self) -> None:
        """Every waiting job that has a slot per answer, in order (a job that has to wait for slots stops the line),
        taken into `_ready` with its prompt embedded: one template and image-encoding pass for all of them."""
        self._reset_idle()  # a slot taken below must not be reset after its new request started in it
        reqs = []
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if job.n > self.max_batch:
                self._waiting.popleft()
                job.on_event(Failure(ValueError(f"n={job.n} exceeds the server's {self.max_batch} slots")))
                continue
            if len(self._free) < job.n:
                break  # first come, first served: later jobs do not overtake it
            self._waiting.popleft()
            reqs.append(_Request(job, [_Row(job, i) for i in range(job.n)],
                                 [heapq.heappop(self._free) for _ in range(job.n)]))
        if not reqs:
            return
        try:
            self._embed(reqs)
        except Exception as exc:  # noqa: BLE001 -- one by one below, which gives the error to its own request
            if len(reqs) == 1:
                log.warning("request refused before decoding: %s", exc)
                self._fail(reqs[0], exc)
                return
            for req in reqs:
                try:
                    self._embed([req])
                except Exception as one:  # noqa: BLE001 -- this request's error, reported to it
                    log.warning("request refused before decoding: %s", one)
                    self._fail(req, one)
        self._ready.extend(r for r in reqs if not r.failed)

    def _embed(self, reqs: list[_Request]) -> None:
        """Template, images and input embeddings of `reqs` in one batch; each keeps its own rows (padding cut)."""
        embeds, mask = self.assistant.prepare_rows([r.job.turns for r in reqs], [r.job.images for r in reqs],
                                                   tower=self.tower)
        lengths = mask.sum(-1).tolist()  # a host tensor: no wait for the vision tower
        for req, p in zip(reqs, lengths, strict=True):
            settings = req.job.settings
            if p + settings.max_new_tokens > self.max_len:
                raise ValueError(f"prompt of {p} tokens + max_tokens {settings.max_new_tokens} exceeds the "
                                 f"server's {self.max_len} positions per answer")
        for req, p, e in zip(reqs, lengths, embeds, strict=True):
            req.embeds = e[None, e.shape[0] - p:]
            req.procs = processors(req.job.settings)
            if req.job.settings.do_sample and req.job.settings.seed is not None:
                req.generator = torch.Generator(self.decoder.device).manual_seed(req.job.settings.seed)

    def _prefill_group(self, group: list[_Request]) -> int:
        """Prefill the whole prompts of `group` in one forward pass and start their rows; returns the tokens run."""
        tokens = sum(r.embeds.shape[1] for r in group)
        try:
            logits = self.decoder.prefill_many([r.slots[0] for r in group], [r.embeds for r in group])
        except Exception as exc:  # noqa: BLE001 -- alone, each request meets its own error (or none)
            if len(group) == 1:
                log.warning("prefill failed: %s", exc)
                self._fail(group[0], exc)
                return tokens
            log.warning("prefill of %d prompts together failed (%s); one by one", len(group), exc)
            for req in group:
                self._prefill_chunk(req, req.embeds.shape[1])
            return tokens
        plain = [i for i, req in enumerate(group) if req.greedy and len(req.rows) == 1]
        if plain:  # the common case: one argmax and one read of the host for all of them
            self._start_greedy([group[i] for i in plain], logits if len(plain) == len(group) else logits[plain])
        started = set(plain)
        for i, req in enumerate(group):
            if i not in started:
                req.prefilled = req.embeds.shape[1]
                self._start(req, logits[i:i + 1])
        return tokens

    def _start_greedy(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        """`_start` for greedy requests with one answer each (their first tokens: the argmax of `logits`, one row each),
        chosen and fed to the decoder on the device; the host reads them once, waiting without the interpreter lock."""
        dec = self.decoder
        index = torch.tensor([r.slots[0] for r in reqs], device=dec.device)
        picked = logits.argmax(-1)
        dec.tok[index, 0] = picked
        dec.live[index, 0] = 1
        first = _read(picked)
        for req, token in zip(reqs, first, strict=True):
            p = req.embeds.shape[1]
            req.embeds = None  # the cache holds the prompt now
            req.prefilled = p
            slot = req.slots[0]
            self._active[slot] = _Active(req.rows[0], req, p)
            self._accept(slot, token)

    def _prefill_chunk(self, req: _Request, budget: int) -> int:
        """Prefill up to `budget` more prompt tokens of `req`; on the last chunk its rows start decoding."""
        p = req.embeds.shape[1]
        t = min(budget, p - req.prefilled)
        try:
            logits = self.decoder.prefill(req.slots[0], req.embeds[:, req.prefilled:req.prefilled + t], req.prefilled)
        except Exception as exc:  # noqa: BLE001 -- reported to its request, the others go on
            log.warning("prefill failed: %s", exc)
            if self._prefill is req:
                self._prefill = None
            self._fail(req, exc)
            return max(t, 1)
        req.prefilled += t
        if req.prefilled == p:
            if self._prefill is req:
                self._prefill = None
            self._start(req, logits)
        return t

    def _start(self, req: _Request, logits: torch.Tensor) -> None:
        """The prompt of `req` is in its first slot and `logits` (1, vocab) follow it: copy the prompt to the other
        answers' slots, choose each row's first token and start decoding them."""
        p = req.embeds.shape[1]
        try:
            for slot in req.slots[1:]:
                self.decoder.copy_slot(req.slots[0], slot, p)
            first = self._choose([(row, req) for row in req.rows], logits.expand(len(req.rows), -1))
        except Exception as exc:  # noqa: BLE001 -- reported to its request, the others go on
            log.warning("starting a request failed: %s", exc)
            self._fail(req, exc)
            return
        if req.failed:  # its sampling failed (and reported)
            return
        req.embeds = None  # the cache holds the prompt now
        req.prefilled = p
        dec = self.decoder
        index = torch.tensor(req.slots, device=dec.device)
        dec.tok[index, 0] = torch.tensor(first, device=dec.device)
        dec.live[index, 0] = 1
        for row, slot in zip(req.rows, req.slots, strict=True):
            self._active[slot] = _Active(row, req, p)
        for slot, token in zip(req.slots, first, strict=True):
            self._accept(slot, token)

    # ------------------------------------------------------------------ decoding

    def _decode_step(self) -> None:
        """Queue the next greedy step, then stream the one before it; rows that sample: one step, synchronously."""
        greedy = bool(self._active) and all(a.request.greedy for a in self._active.values())
        with self._timed("launch"):
            launched = self._launch() if greedy else None
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            self._consume(previous)
        if not greedy and self._active:
            with self._timed("sampled"):
                self._sampled_step()

    def _run_step(self, lead: int) -> torch.Tensor | None:
        """One decode step over the slots in use (`lead`: positions the device may be ahead of `_Active.pos`); its
        logits, or None when it failed (its rows are failed)."""
        self.most_rows = max(self.most_rows, len(self._active))
        self._reset_idle()
        try:
            logits = self.decoder.decode(max(self._active) + 1, max(a.pos for a in self._active.values()) + 1 + lead)
        except Exception as exc:  # one forward pass over every row: all of them are affected
            log.exception("decode step over %d rows failed", len(self._active))
            self._fail_all(exc, prefill=False)  # the requests being prefilled were not in the step
            return None
        self.steps += 1
        return logits

    def _launch(self) -> _Step | None:
        """Queue a greedy step: tokens chosen and fed back on the device, and copied to the host asynchronously."""
        rows = dict(self._active)
        logits = self._run_step(lead=1)  # the step still in flight advanced the positions by one
        if logits is None:
            return None
        picked = logits.argmax(-1)
        self.decoder.tok[: picked.shape[0], 0].copy_(picked)
        self._host_tokens.reverse()
        host = self._host_tokens[0][: picked.shape[0]]
        host.copy_(picked, non_blocking=True)
        ready = None
        if picked.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return _Step(rows, host, ready)

    def _consume(self, step: _Step) -> None:
        """Stream the tokens of a queued step to the rows it decoded for that are still running."""
        with self._timed("wait"):
            if step.ready is not None:
                step.ready.synchronize()  # without the interpreter lock: the HTTP side runs meanwhile
            tokens = step.tokens.tolist()
        with self._timed("stream"):
            for slot, a in step.rows.items():
                if self._active.get(slot) is a:  # not ended, failed or cancelled since the launch
                    a.pos += 1
                    self._accept(slot, tokens[slot])

    def _sampled_step(self) -> None:
        """A step with rows that sample: tokens chosen on the host (processors, per-request generators)."""
        dec = self.decoder
        logits = self._run_step(lead=0)
        if logits is None:
            return
        order = sorted(self._active, key=lambda s: self._active[s].row.index)  # a shared generator: row order
        picks = self._choose([(self._active[s].row, self._active[s].request) for s in order],
                             logits[torch.tensor(order, device=logits.device)])
        chosen = [(slot, token) for slot, token in zip(order, picks, strict=True) if token >= 0]
        if chosen:
            slots, tokens = zip(*chosen, strict=True)
            dec.tok[torch.tensor(slots, device=dec.device), 0] = torch.tensor(tokens, device=dec.device)
        for slot, token in chosen:
            a = self._active.get(slot)
            if a is not None:  # None: its request failed while choosing
                a.pos += 1
                self._accept(slot, token)

    def _choose(self, rows: list[tuple[_Row, _Request]], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits row (-1 for a row whose request failed).

        Rows that need neither their own generator nor their own history (greedy, or unseeded sampling without a
        repetition penalty) go in groups of equal settings, one processors call and one draw per group; the others
        one by one. A group that raises is retried row by row, so that the failure reaches its own request.
        """
        out: list[int | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, (_, req) in enumerate(rows):
            s = req.job.settings
            if req.generator is None and s.repetition_penalty == 1.0 and not req.failed:
                groups.setdefault((s.do_sample, s.temperature, s.top_k, s.top_p), []).append(i)
        for (do_sample, *_), idx in groups.items():
            try:
                scores = logits[torch.tensor(idx, device=logits.device)]
                procs = rows[idx[0]][1].procs
                if procs:
                    scores = procs(torch.empty(len(idx), 0, dtype=torch.long, device=logits.device), scores)
                picked = torch.multinomial(scores.softmax(-1), 1)[:, 0] if do_sample else scores.argmax(-1)
            except Exception as exc:  # noqa: BLE001 -- retried row by row below, which attributes it
                log.debug("sampling a group of %d rows failed (%s); row by row", len(idx), exc)
                continue
            for i, token in zip(idx, picked.tolist(), strict=True):
                out[i] = token
        for i, (row, req) in enumerate(rows):
            if out[i] is not None or req.failed:
                continue
            try:
                ids = torch.tensor([row.tokens], dtype=torch.long, device=logits.device)
                scores = req.procs(ids, logits[i:i + 1])
                if req.job.settings.do_sample:
                    out[i] = int(torch.multinomial(scores.softmax(-1), 1, generator=req.generator))
                else:
                    out[i] = int(scores.argmax(-1))
            except Exception as exc:  # noqa: BLE001 -- reported to its request, the others go on
                log.warning("sampling failed: %s", exc)
                self._fail(req, exc)
        return [t if t is not None else -1 for t in out]

    def _accept(self, slot: int, token: int) -> None:
        """Stream the token of the row in `slot`; free the slot once the row is done."""
        a = self._active[slot]
        a.row.advance(token, self.assistant.tokenizer, self.assistant.template.stop_token_ids)
        if a.row.done:
            self._release(slot)

    # ------------------------------------------------------------------ leaving

    def _release(self, slot: int) -> None:
        self._active.pop(slot, None)
        self._idle.append(slot)  # reset on the device by `_reset_idle`, before the slot is used or stepped again
        heapq.heappush(self._free, slot)
        self.rows_run += 1

    def _reset_idle(self) -> None:
        """Stop the slots freed since the last call from advancing, and put them at column 0 (a free slot must never
        write past the cache while it idles in a step): two writes for all of them, not two per slot."""
        if self._idle:
            index = torch.tensor(self._idle, device=self.decoder.device)
            self._idle.clear()
            self.decoder.live[index] = 0
            self.decoder.pos[index] = 0

    def _drop_cancelled(self) -> None:
        for slot in [s for s, a in self._active.items() if a.row.job.cancelled]:
            self._active[slot].row.done = True
            self._release(slot)
        gone = [r for r in self._ready if r.job.cancelled]
        if gone:
            self._ready = deque(r for r in self._ready if not r.job.cancelled)
        if self._prefill is not None and self._prefill.job.cancelled:
            gone.append(self._prefill)
            self._prefill = None
        for req in gone:
            for row, slot in zip(req.rows, req.slots, strict=True):
                row.done = True
                self._release(slot)

    def _fail(self, req: _Request, exc: BaseException) -> None:
        """End all rows of `req` with one Failure event (a request fails whole, as in the static batcher)."""
        if req.failed:
            return
        req.failed = True
        req.job.on_event(Failure(exc))  # first: freeing the slots writes to the GPU, which may be what failed
        for row, slot in zip(req.rows, req.slots, strict=True):
            if not row.done:  # a row that is done gave its slot back already
                row.done = True
                try:
                    self._release(slot)
                    self._reset_idle()
                except Exception:  # a broken device (e.g. a CUDA error that does not clear): see _work
                    self._active.pop(slot, None)
                    raise
