"""Request batching for the API server: many clients' conversations decode together in one `generate` call.

A worker thread takes the pending jobs that share sampling settings (up to `max_batch` rows, waiting at most
`window_s` for company) and runs them through the shared generation path (`Assistant` template, image preprocessing,
left-padded embeddings, HF generate). Each row's text is streamed per decoding step and each row stops on its own
(end of turn, its own `max_tokens`, a stop string, or a client that went away) while the rest of the batch goes on.
Jobs that arrive while a batch runs wait for the next one (batch-level batching: `serve --batching static`;
token-level continuous batching, `--batching continuous`, the default, is scheduler.py, which shares this module's
job, event and row types).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, replace

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..data.conversation import Turn
from .generate import Assistant, GenerationSettings

log = logging.getLogger(__name__)



def _hidden_tail(text: str) -> str:
    """`text` without its trailing whitespace and U+FFFD: whitespace may be stripped at the end and U+FFFD may be half
    a UTF-8 character, so both are held back (rstrip: no regex scan of the whole answer at every token)."""
    while True:
        cut = text.rstrip().rstrip("\ufffd")
        if cut == text:
            return text
        text = cut


@dataclass
class Delta:
    index: int
    text: str


@dataclass
class Finish:
    index: int
    reason: str
    """"stop" (end of turn or a stop string) or "length" (max_tokens reached)."""
    text: str
    """The whole answer; equal to the concatenated deltas."""
    completion_tokens: int


@dataclass
class Failure:
    error: BaseException


Event = Delta | Finish | Failure


@dataclass
class Job:
    """One client request: a conversation (ending with a user turn) answered `n` times."""

    turns: list[Turn]
    images: list
    settings: GenerationSettings
    on_event: Callable[[Event], None]
    """Called from the worker thread; must not block (e.g. `loop.call_soon_threadsafe(queue.put_nowait, event)`)."""
    n: int = 1
    stop: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    cancelled: bool = False
    """Set when the client disconnects: its rows stop at the next step."""

    def key(self) -> tuple:
        """Jobs with equal keys can share a batch; a seeded job runs alone so that its seed reproduces its answer."""
        unseeded = replace(self.settings, max_new_tokens=0, num_return_sequences=1)
        return (id(self),) if self.settings.seed is not None else astuple(unseeded)


class _Row:
    """One answer being decoded: its tokens, the text already sent, why it stopped.

    The text grows incrementally (the windowed detokenisation of TGI and vLLM): each token decodes only the tokens
    since the last complete character, not the whole answer again, so a step costs the same at token 10 and token
    2,000. The final text is one full decode, so it equals `tokenizer.decode(tokens)` exactly.
    """

    def __init__(self, job: Job, index: int) -> None:
        self.job, self.index = job, index
        self.tokens: list[int] = []
        self.sent = ""
        self.done = False
        self.text = ""
        """tokens[:_read] decoded."""
        self._prefix = 0  # tokens[_prefix:_read] is the context the next decode starts from
        self._read = 0

    def visible(self, text: str) -> tuple[str, bool]:
        """(answer so far, hit a stop string): leading whitespace dropped, cut before the first stop string."""
        text = text.lstrip()
        cuts = [i for i in (text.find(s) for s in self.job.stop) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def emit_until(self, safe: str) -> None:
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.job.on_event(Delta(self.index, safe[len(self.sent):]))
            self.sent = safe

    def _grow(self, tokenizer) -> str:
        """Decode the new tokens in the context of the previous ones; a token that ends inside a UTF-8 character
        (U+FFFD at the end) waits for the next."""
        before = tokenizer.decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = tokenizer.decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
        return self.text

    def full_text(self, tokenizer) -> str:
        return tokenizer.decode(self.tokens, skip_special_tokens=True)

    def advance(self, token: int, tokenizer, stop_ids: set[int] | list[int]) -> None:
        """Take the row's next token: stream what is safe to show, finish on a stop id, stop string or max_tokens.

        Shared by both batching modes (the static batch's stopping criterion and the continuous scheduler)."""
        if token in stop_ids:
            self.finish(self.visible(self.full_text(tokenizer))[0], "stop")
            return
        self.tokens.append(token)
        text, hit_stop = self.visible(self._grow(tokenizer))
        if hit_stop:
            self.finish(self.visible(self.full_text(tokenizer))[0], "stop")
        elif len(self.tokens) >= self.job.settings.max_new_tokens:
            self.finish(self.visible(self.full_text(tokenizer))[0], "length")
        else:
            hold = max((len(s) for s in self.job.stop), default=1) - 1  # a stop string may be starting
            self.emit_until(_hidden_tail(text[: len(text) - hold]))

    def finish(self, text: str, reason: str) -> None:
        final = text.rstrip()
        if final.startswith(self.sent):
            self.emit_until(final)
        else:  # a decode that rewrote already-sent text (should not happen with byte-level BPE)
            log.warning("streamed text diverged from the final decode; the stream keeps what it sent")
        self.done = True
        self.job.on_event(Finish(self.index, reason, final, len(self.tokens)))

class BatchStreamer(StoppingCriteria):
    """Per-row streaming and stopping for a batch, hooked in as a stopping criterion.

    A stopping criterion (rather than a `BaseStreamer`) sees every new token of every row on each step on all
    transformers versions (5.24 calls it before the streamer, 5.17 after), and its answer ends single rows early.
    """

    def __init__(self, tokenizer, rows: list[_Row], stop_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.rows = rows
        self.stop_ids = set(stop_ids)
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if row.done:
                continue
            if row.job.cancelled:
                row.done = True
                continue
            row.advance(token, self.tokenizer, self.stop_ids)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)

    def close(self) -> None:
        """Rows still open when generate returns ran into the batch's length limit."""
        for row in self.rows:
            if not row.done:
                row.finish(row.visible(row.full_text(self.tokenizer))[0], "length")


class Worker:
    """Jobs submitted from any thread, answered on one daemon thread (`_work`; None in the queue: finish, stop)."""

    thread_name = "worker"

    def __init__(self) -> None:
        self._pending: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.thread_name, daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    def submit(self, job: Job) -> None:
        self.start()
        self._pending.put(job)

    def _work(self) -> None:
        raise NotImplementedError


class Batcher(Worker):
    """Collects jobs from any thread and answers them in batches on one worker thread."""

    thread_name = "batcher"

    def __init__(self, assistant: Assistant, max_batch: int = 8, window_s: float = 0.01) -> None:
        super().__init__()
        self.assistant = assistant
        self.max_batch = max(1, max_batch)
        self.window_s = window_s
        self._held: collections.deque[Job] = collections.deque()  # taken from the queue but not yet run
        self.batches_run = 0
        self.rows_run = 0
        self.most_rows = 0
        """Most rows decoded together so far (the continuous scheduler counts the same)."""

    # ------------------------------------------------------------------ worker

    def _next(self, timeout: float | None) -> Job | None:
        """The oldest held job, else one from the queue; raises queue.Empty after `timeout`."""
        if self._held:
            return self._held.popleft()
        return self._pending.get(timeout=timeout) if timeout is None or timeout > 0 else self._pending.get_nowait()

    def _collect(self) -> list[Job] | None:
        """A group of jobs with one key: the oldest job plus whatever joins it within the window."""
        first = self._next(None)
        if first is None:
            return None
        group, rows, passed = [first], first.n, []
        deadline = time.monotonic() + self.window_s
        while rows < self.max_batch:
            try:
                job = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            if job is None:  # closing: finish what is collected first
                self._pending.put(None)
                break
            if job.cancelled:
                continue
            if job.key() == first.key() and rows + job.n <= self.max_batch:
                group.append(job)
                rows += job.n
            else:
                passed.append(job)
        self._held.extendleft(reversed(passed))
        return group

    def _work(self) -> None:
        while True:
            group = self._collect()
            if group is None:
                return
            group = [j for j in group if not j.cancelled]
            if group:
                self.run(group)

    def run(self, jobs: list[Job]) -> None:
        """Decode all rows of `jobs` (which share a key) in one generate call.

        A failure before the first step (one conversation the template or the image preprocessing rejects) is
        retried job by job, so that it reaches its own request only; one while decoding goes to the jobs still open.
        """
        rows = [_Row(job, i) for job in jobs for i in range(job.n)]
        a = self.assistant
        settings = replace(jobs[0].settings, num_return_sequences=1,
                           max_new_tokens=max(j.settings.max_new_tokens for j in jobs))
        streamer = BatchStreamer(a.tokenizer, rows, a.template.stop_token_ids)
        try:
            with a.lock, torch.inference_mode():
                kwargs = a._generate_kwargs([r.job.turns for r in rows], [r.job.images for r in rows], settings)
                a.model.llm.generate(**kwargs, stopping_criteria=StoppingCriteriaList([streamer]))
            streamer.close()
        except Exception as exc:  # the server keeps serving
            if streamer.steps == 0 and len(jobs) > 1:
                log.warning("batch of %d jobs failed before decoding (%s); running them one by one", len(jobs), exc)
                for job in jobs:
                    self.run([job])
                return
            log.exception("batch of %d rows failed", len(rows))
            for job in jobs:
                if any(not r.done for r in rows if r.job is job):
                    job.on_event(Failure(exc))
        self.batches_run += 1
        self.rows_run += len(rows)
        self.most_rows = max(self.most_rows, len(rows))
