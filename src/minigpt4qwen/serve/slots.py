"""A FastDecoder whose batch rows are independent slots: the decoder of continuous batching (serve/scheduler.py).

    dec = SlotDecoder(model.llm, slots=64, max_len=2048)
    logits = dec.prefill(slot=3, embeds=prompt_embeds[:, 0:256], start=0)      # chunk 1 of a prompt
    logits = dec.prefill(slot=3, embeds=prompt_embeds[:, 256:300], start=256)  # last chunk: next-token logits
    dec.tok[3] = first_token; dec.live[3] = 1
    logits = dec.decode(width=4)   # one token for slots 0..3 (live ones advance), logits (4, vocab)

Each slot holds one sequence from cache column 0 without padding, so a row's cache column equals its rotary
position and its tokens are those it would get decoded alone. A decode step writes every row's K/V at its own
column (`pos`) and masks each row to its own columns, so rows of any lengths share a step, a slot that is freed is
reused by overwriting it, and a prompt is prefilled in chunks into one slot between decode steps of the others.
Shapes depend only on (rows, attended columns), both bucketed to powers of two, so on CUDA each bucket's step is
captured once as a CUDA graph and replayed; sampling happens outside the graph on the logits it leaves behind.
"""

from __future__ import annotations

import torch
from torch import nn

from .fastdecode import FastDecoder

MIN_KV = 128
"""The smallest attended-column bucket: fewer graphs for short sequences, little work wasted on masked columns."""


def bucket(n: int, smallest: int, largest: int) -> int:
    """The power of two (at least `smallest`) that holds n, capped at `largest`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


class SlotDecoder(FastDecoder):
    """Slots 0..slots-1 of a static KV cache, each with its own length; not thread-safe (one scheduler drives it)."""

    def __init__(self, llm: nn.Module, slots: int, max_len: int, cuda_graph: bool | None = None,
                 fuse: bool = False, compile: bool | str = False) -> None:
        super().__init__(llm, max_batch=slots, max_len=max_len, cuda_graph=cuda_graph, fuse=fuse, compile=compile)
        vocab = self.lm_head.weight.shape[0]
        with torch.device(self.device):
            self.live = torch.zeros(slots, 1, dtype=torch.long)  # 1: the slot decodes, its position advances
            self.logits = torch.zeros(slots, vocab, dtype=torch.float32)
            self.cols = torch.arange(self.max_len)
            self.zero = torch.zeros((), dtype=self.dtype)
            self.masked = torch.full((), self.neg, dtype=self.dtype)
        self._row0 = 0  # first cache row `_write_kv` addresses (prefill writes one slot)
        self._rows: torch.Tensor | None = None  # the slots `prefill_many` writes, one per batch row
        # compiled with symbolic rows and columns: one compile serves every bucket (dynamo still specialises one row
        # against several, and the full cache width against a slice of it: at most 4 graphs, not one per bucket);
        # each bucket's CUDA graph then captures the compiled step
        mode = compile if isinstance(compile, str) else None
        self._step = torch.compile(self._slot_step, dynamic=True, mode=mode) if compile else self._slot_step

    def _write_kv(self, i: int, k: torch.Tensor, v: torch.Tensor,
                  slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = k.shape[0]
        if self._rows is not None:  # whole prompts of several slots from column 0: they attend to themselves only
            self._store(i, self._rows[:, None], slots[None, :], k, v)
            return k, v
        # prefill: one slot's row, the same columns (1-D); decode: one new token per row at its own column (B, 1)
        first = self._row0
        self._store(i, self.rows[first:first + b, None], slots[None, :] if slots.dim() == 1 else slots, k, v)
        return self.keys[i][first:first + b], self.values[i][first:first + b]

    def _slot_step(self, width: int, kv_len: int) -> None:
        """Logits of the next token for rows [0, width), attending to columns [0, kv_len): fixed buffers only."""
        pos = self.pos[:width]
        visible = self.cols[:kv_len].view(1, 1, 1, kv_len) <= pos.view(width, 1, 1, 1)
        bias = torch.where(visible, self.zero, self.masked)
        logits = self._logits(self.embed(self.tok[:width]), pos, pos, bias, kv_len)
        self.logits[:width].copy_(logits)
        pos.add_(self.live[:width])

    def _state(self) -> list[torch.Tensor]:
        return [self.tok, self.pos, self.logits]

    # ------------------------------------------------------------------ what the scheduler calls

    @torch.inference_mode()
    def prefill(self, slot: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Run prompt positions [start, start + T) of `slot` (embeds (1, T, d)); their K/V stay in the slot.

        Returns the next-token logits after the chunk (1, vocab); the slot's position is set to the chunk's end.
        """
        t = embeds.shape[1]
        end = start + t
        if end > self.max_len:
            raise ValueError(f"prompt of {end} positions exceeds the slot length {self.max_len}")
        positions = torch.arange(start, end, device=self.device)
        visible = self.cols[:end][None, :] <= positions[:, None]
        bias = torch.where(visible, self.zero, self.masked)[None, None]
        self._row0 = slot
        try:
            logits = self._logits(embeds.to(self.device, self.dtype), positions[None], positions, bias, end)
        finally:
            self._row0 = 0
        self.pos[slot, 0] = end
        return logits

    @torch.inference_mode()
    def prefill_many(self, slots: list[int], embeds: list[torch.Tensor]) -> torch.Tensor:
        """Whole prompts (embeds[i]: (1, T_i, d)) into `slots[i]`, all in one forward pass: requests that arrive
        together share one pass over the weights instead of one each. Rows are right-padded to the longest; a
        padded position comes after its row's prompt, so the causal mask already hides it from the real ones, and
        the K/V it writes lies past the row's position, where decoding overwrites it before reading it.

        Returns each prompt's next-token logits (len(slots), vocab); each slot's position is set to its length.
        """
        lengths = [e.shape[1] for e in embeds]
        t = max(lengths)
        if t > self.max_len:
            raise ValueError(f"prompt of {t} positions exceeds the slot length {self.max_len}")
        x = nn.utils.rnn.pad_sequence([e[0].to(self.device, self.dtype) for e in embeds], batch_first=True)
        positions = torch.arange(t, device=self.device)
        bias = torch.where(self.cols[:t][None, :] <= positions[:, None], self.zero, self.masked)[None, None]
        rows = torch.tensor(slots, device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        self._rows = rows
        try:
            h = self._hidden(x, positions.expand(len(slots), t), positions, bias, t)
        finally:
            self._rows = None
        h = h[torch.arange(len(slots), device=self.device), last]
        self.pos[rows, 0] = last + 1
        return self.lm_head(self.decoder.norm(h)).float()

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Give `dst` the prompt cache of `src` (the n answers of one request share one prefill)."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]
        self.pos[dst] = self.pos[src]

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every (width, kv_len) bucket's graph now, while no slot is in use (all positions 0: the warm-up
        steps write column 0 only), so that no capture (a device sync, ~0.2-0.5 s) lands among running requests.
        Returns how many graphs exist; 0 without CUDA graphs."""
        if not self.cuda_graph:
            return 0
        widths = sorted({bucket(w, 1, self.max_batch) for w in range(1, self.max_batch + 1)})
        kv_lens = sorted({bucket(n, MIN_KV, self.max_len) for n in range(1, self.max_len + 1)})
        for width in widths:
            for kv_len in kv_lens:
                self._graph(width, kv_len)
        return len(self._graphs)

    @torch.inference_mode()
    def decode(self, width: int, kv_len: int) -> torch.Tensor:
        """One step for slots [0, width) attending to [0, kv_len) (buckets of both keep the graphs few); live
        slots advance. Returns the logits buffer's rows (width, vocab), valid until the next step."""
        width = bucket(width, 1, self.max_batch)
        kv_len = bucket(kv_len, MIN_KV, self.max_len)
        if self.cuda_graph:
            self._graph(width, kv_len).replay()
        else:
            self._step(width, kv_len)
        return self.logits[:width]
