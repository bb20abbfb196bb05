"""Training dataset: annotation files -> encoded conversations + preprocessed images, and a resumable sampler."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from ..config import DataConfig
from .conversation import ChatTemplate, OverlongError
from .formats import BadSampleError, Sample, load_annotations
from .images import ImageError, ImageProcessor, load_image

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    """What loading found: usable rows, and rows/samples dropped under on_bad_sample=skip."""

    rows: int = 0
    skipped_rows: int = 0
    skipped_images: int = 0


class InstructionDataset(Dataset):
    """Mix of annotation files; item = dict(input_ids, labels, pixel_values, source) or None when skipped."""

    def __init__(
        self, specs, template: ChatTemplate, processor: ImageProcessor, data_cfg: DataConfig, seed: int = 0
    ) -> None:
        self.template = template
        self.processor = processor
        self.max_txt_len = data_cfg.max_txt_len
        self.on_bad = data_cfg.on_bad_sample
        self.seed = seed
        self.epoch = 0
        self.stats = DataStats()
        self.samples: list[Sample] = []
        for spec in specs:
            samples, skipped = load_annotations(spec.path, spec.image_root, spec.format, self.on_bad)
            self.samples += samples
            self.stats.skipped_rows += len(skipped)
            for line in skipped[:5]:
                log.warning("skipped: %s", line)
        self.features: dict[Path, torch.Tensor] | None = None  # set by cache_features(): no images loaded then
        self.stats.rows = len(self.samples)
        if not self.samples:
            raise BadSampleError("no usable samples in " + ", ".join(str(s.path) for s in specs))
        missing = [(s.source, p) for s in self.samples for p in s.images if not p.is_file()]
        if missing:
            src, p = missing[0]
            msg = f"{len(missing)} image file(s) missing, first: {p} ({src}); check image_root"
            if self.on_bad != "skip":
                raise ImageError(msg + " or set data.on_bad_sample=skip")
            log.warning("%s; those samples are skipped", msg)
            bad = {id(s) for s in self.samples if any(not p.is_file() for p in s.images)}
            self.samples = [s for s in self.samples if id(s) not in bad]
            self.stats.skipped_images += len(bad)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict | None:
        sample = self.samples[index]
        try:
            enc = self.template.encode(sample.turns, self.max_txt_len)
            # one generator per (seed, epoch, index): the same crops whatever the worker count or resume point
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            if self.features is not None:
                feats = [self.features[sample.images[i]] for i in enc.kept_images]
                pixels = []
            else:
                pixels = [self.processor(load_image(sample.images[i]), gen) for i in enc.kept_images]
        except (ImageError, OverlongError) as exc:
            if self.on_bad != "skip":
                raise type(exc)(f"{sample.source}: {exc} (or set data.on_bad_sample=skip)") from None
            log.warning("skipping %s: %s", sample.source, exc)
            return None
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": torch.stack(pixels) if pixels else None,
            "features": torch.stack(feats) if self.features is not None and feats else None,
            "truncated": enc.truncated,
            "source": sample.source,
        }


    def lengths(self) -> list[int]:
        """Prompt length in tokens of every sample (images counted by their placeholder positions), for batching."""
        out = []
        for s in self.samples:
            try:
                out.append(len(self.template.encode(s.turns, self.max_txt_len).input_ids))
            except (OverlongError, ValueError):  # reported (or skipped) when the sample is loaded
                out.append(0)
        return out

    def image_paths(self) -> list[Path]:
        return sorted({p for s in self.samples for p in s.images})

    @torch.no_grad()
    def cache_features(self, encode, batch_size: int = 64) -> None:
        """Compute `encode(pixels) -> (N, Q, D)` once per distinct image (eval preprocessing, no augmentation).

        Images that fail to load follow on_bad_sample: error names the file, skip drops the samples using them.
        """
        from tqdm.auto import tqdm

        proc = ImageProcessor(self.processor.size, train=False)
        paths, feats, bad = self.image_paths(), {}, set()
        for i in tqdm(range(0, len(paths), batch_size), desc="caching image features", leave=False):
            chunk, pixels = [], []
            for p in paths[i : i + batch_size]:
                try:
                    pixels.append(proc(load_image(p)))
                    chunk.append(p)
                except ImageError as exc:
                    if self.on_bad != "skip":
                        raise ImageError(f"{exc} (or set data.on_bad_sample=skip)") from None
                    bad.add(p)
            if pixels:
                out = encode(torch.stack(pixels)).cpu()
                feats.update(zip(chunk, out.unbind(0)))
        if bad:
            log.warning("%d image(s) could not be loaded; their samples are skipped", len(bad))
            self.samples = [s for s in self.samples if not bad.intersection(s.images)]
            self.stats.skipped_images += len(bad)
        self.features = feats


def length_grouped(perm: list[int], lengths: list[int], group: int, window: int, seed: int) -> list[int]:
    """Reorder a shuffled `perm` so that each run of `group` consecutive samples has similar lengths.

    The permutation is cut into windows of `window` groups; inside a window the samples are sorted by length
    (longest first), cut into groups, and the groups shuffled, so batches stay random in content and order while
    padding shrinks to a few percent (LLaVA's length-grouped sampler does the same with mega-batches). The longest
    group of the first window goes first, so an out-of-memory batch shows up at step 1, not hours in.
    """
    rng = torch.Generator().manual_seed(seed)
    out: list[int] = []
    span = group * max(window, 1)
    for w, start in enumerate(range(0, len(perm), span)):
        chunk = sorted(perm[start : start + span], key=lambda i: -lengths[i])
        groups = [chunk[i : i + group] for i in range(0, len(chunk), group)]
        # a short group (only the data's last window has one) stays last: shuffled in, it would shift every later
        # batch off its group boundary
        full = len(groups) - (len(groups[-1]) < group)
        order = torch.randperm(full, generator=rng).tolist() + list(range(full, len(groups)))
        if w == 0 and full:
            order.remove(0)
            order.insert(0, 0)
        out += [i for g in order for i in groups[g]]
    return out


class ResumableSampler(Sampler[int]):
    """Seeded permutation per epoch, sharded over ranks, that can start at any position (for exact resume).

    With `lengths`, the samples of each optimizer step (`batch_size` = micro-batch x accumulation, times the world
    size) are grouped by length (see `length_grouped`); rank r still takes every world_size-th sample, so each rank's
    micro-batches come from one group, and batch 8 x accumulation 1 sees per step what 4 x 2 sees.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 lengths: list[int] | None = None, batch_size: int = 1, window: int = 64) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.lengths, self.batch_size, self.window = lengths, batch_size, window
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} samples")
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """`start` = samples of this rank's shard already consumed."""
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        if self.lengths is not None:
            perm = length_grouped(perm, self.lengths, self.batch_size * self.world_size, self.window,
                                  self.seed * 7919 + self.epoch)
        per_rank = len(perm) // self.world_size if self.world_size > 1 else len(perm)
        return perm[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return (self.n // self.world_size if self.world_size > 1 else self.n) - self.start
