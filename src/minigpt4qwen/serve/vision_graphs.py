"""The vision tower + Q-Former as CUDA graphs, one per batch-size bucket: admissions of the continuous scheduler.

    tower = GraphedTower(model, max_images=64)
    tower.capture_all()                      # at server start, beside the decoder's graphs
    features = tower(pixel_values)           # (n, 3, H, W) -> (n, queries, width); eager beyond 64 or off CUDA

Every admission runs the frozen EVA ViT-g (39 layers) and the Q-Former (12) on its new images: ~1,200 eager CUDA
calls, each of which releases and re-takes the interpreter lock while the HTTP side streams (serve/scheduler.py
PHASES: `admit`). A graph replays them in one call. Images of a batch are independent through both towers, so a batch
of n images runs in the bucket of the next power of two, its extra rows left from earlier batches (computed and
dropped). Opt-in (`serve --graph-vision`) until it is measured on a GPU.
"""

from __future__ import annotations

import torch

from .slots import bucket


class GraphedTower:
    """`model.qformer_features` through captured graphs for batches of up to `max_images` images at one image size."""

    def __init__(self, model, max_images: int, image_size: int) -> None:
        self.model = model
        self.max_images = max(1, max_images)
        self.cuda = model.device.type == "cuda"
        self.image_size = image_size
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        with torch.inference_mode():  # as every write to it happens (the scheduler's thread runs in inference mode)
            self._input = torch.zeros(self.max_images, 3, image_size, image_size, device=model.device) \
                if self.cuda else None

    def _graph(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph of one bucket and the output buffer it writes; captured on first use (warm-up on a side stream
        first, as CUDA graphs require)."""
        if size in self._graphs:
            return self._graphs[size]
        x = self._input[:size]
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model.qformer_features(x)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model.qformer_features(x)
        self._pool = graph.pool()
        self._graphs[size] = (graph, out)
        return graph, out

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every bucket now (a capture among running requests would stall them); how many graphs exist."""
        if not self.cuda:
            return 0
        for size in sorted({bucket(n, 1, self.max_images) for n in range(1, self.max_images + 1)}):
            self._graph(size)
        return len(self._graphs)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n = pixel_values.shape[0]
        if not self.cuda or n > self.max_images or tuple(pixel_values.shape[1:]) != tuple(self._input.shape[1:]):
            return self.model.qformer_features(pixel_values)
        self._input[:n].copy_(pixel_values, non_blocking=True)
        graph, out = self._graph(bucket(n, 1, self.max_images))
        graph.replay()
        return out[:n].clone()  # the buffer belongs to the graph: the next admission overwrites it
