"""Offline synthetic image-instruction data: Pillow-drawn scenes with known shape, color, count and position.

    minigpt4qwen make-data --out data/shapes

Writes train_seed.json (the seed's format, multi-turn), train_llava.json (LLaVA's format), heldout.json (one
question per row, new images), and mme/ (an MME-layout yes/no split: existence, count, position, color).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle"]
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
COUNT_WORDS = ["zero", "one", "two", "three"]
GRID = 4


@dataclass
class Scene:
    shape: str
    color: str
    count: int
    position: str | None  # left/right, only for a single shape

    def qa(self) -> list[tuple[str, str, str]]:
        """(kind, question, answer) pairs answerable from the image."""
        noun = "shape" if self.count == 1 else "shapes"
        verb = "is" if self.count == 1 else "are"
        items = [
            ("color", f"What color {verb} the {noun}?", self.color),
            ("shape", f"What kind of shape {verb} in the image?", self.shape),
            ("count", "How many shapes are there?", COUNT_WORDS[self.count]),
        ]
        if self.position:
            items.append(("position", "Is the shape on the left or on the right?", self.position))
        return items


def sample_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 3)
    return Scene(rng.choice(SHAPES), rng.choice(list(COLORS)), count, rng.choice(["left", "right"]) if count == 1 else None)


def draw_scene(scene: Scene, rng: random.Random, size: int = 96) -> Image.Image:
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    color = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[scene.color])
    # objects sit in distinct cells of a 4x4 grid (one ViT patch each at the demo's resolution), jittered a little
    cell = size / GRID
    if scene.position:
        cols = [0, 1] if scene.position == "left" else [2, 3]
        cells = [(rng.choice(cols), rng.randrange(GRID))]
    else:
        cells = rng.sample([(c, r) for c in range(GRID) for r in range(GRID)], scene.count)
    for col, row in cells:
        r = cell * rng.uniform(0.34, 0.4)
        jitter = cell / 2 - r - 1
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        box = [cx - r, cy - r, cx + r, cy + r]
        if scene.shape == "circle":
            d.ellipse(box, fill=color)
        elif scene.shape == "square":
            d.rectangle(box, fill=color)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=color)
    return img


def _yes_no_pairs(scene: Scene, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """MME-style: for each subtask one question whose answer is yes and one whose answer is no."""
    other_color = rng.choice([c for c in COLORS if c != scene.color])
    other_count = rng.choice([c for c in (1, 2, 3) if c != scene.count])
    out = {
        "existence": [(f"Is there a {scene.shape} in this image?", "yes"),
                      (f"Is there a {rng.choice([s for s in SHAPES if s != scene.shape])} in this image?", "no")],
        "count": [(f"Are there {COUNT_WORDS[scene.count]} shapes in this image?", "yes"),
                  (f"Are there {COUNT_WORDS[other_count]} shapes in this image?", "no")],
        "color": [(f"Is the {scene.shape} {scene.color}?", "yes"), (f"Is the {scene.shape} {other_color}?", "no")],
    }
    if scene.position:
        other = "right" if scene.position == "left" else "left"
        out["position"] = [(f"Is the shape on the {scene.position} side of the image?", "yes"),
                           (f"Is the shape on the {other} side of the image?", "no")]
    suffix = " Please answer yes or no."
    out = {k: [(q + suffix, a) for q, a in pair] for k, pair in out.items()}
    for pair in out.values():
        rng.shuffle(pair)
    return out


def write_dataset(out: str | Path, n_train: int = 2000, n_heldout: int = 200, image_size: int = 96, seed: int = 0,
                  n_mme: int = 40, llava_share: float = 0.25, yes_no_share: float = 0.0) -> dict:
    """Write the synthetic data set; returns paths and counts."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seed_rows, llava_rows = [], []
    for i in range(n_train):
        scene = sample_scene(rng)
        name = f"images/train_{i:05d}.png"
        draw_scene(scene, rng, image_size).save(out / name)
        qa = scene.qa()
        if rng.random() < yes_no_share:  # MME-style yes/no questions (off in the demo: they cost CPU time)
            kind, pair = rng.choice(list(_yes_no_pairs(scene, rng).items()))
            qa.append((kind, *rng.choice(pair)))
        rng.shuffle(qa)
        kept = qa[: rng.randint(2, len(qa))]
        # left/right is the attribute the frozen LLM picks up slowest: ask it whenever the scene has one
        position = [x for x in qa if x[0] == "position"]
        if position and position[0] not in kept:
            kept[-1] = position[0]
        qa = kept
        if rng.random() < llava_share:
            conv = []
            for k, (_, q, a) in enumerate(qa):
                conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
            llava_rows.append({"id": name, "image": name, "conversations": conv})
        else:
            questions = [("<Img><ImageHere></Img> " if k == 0 else "") + q for k, (_, q, _) in enumerate(qa)]
            seed_rows.append({"image": name, "instruction": questions, "output": [a for _, _, a in qa]})
    heldout = []
    for i in range(n_heldout):
        scene = sample_scene(rng)
        name = f"images/heldout_{i:05d}.png"
        draw_scene(scene, rng, image_size).save(out / name)
        kind, q, a = rng.choice(scene.qa())
        heldout.append({"image": name, "instruction": f"<Img><ImageHere></Img> {q}", "output": a, "kind": kind})
    (out / "train_seed.json").write_text(json.dumps(seed_rows, indent=1))
    (out / "train_llava.json").write_text(json.dumps(llava_rows, indent=1))
    (out / "heldout.json").write_text(json.dumps(heldout, indent=1))
    n_q = 0
    for i in range(n_mme):  # MME layout: each image beside a .txt of the same stem, two lines question<TAB>yes|no
        scene = sample_scene(rng)
        img = draw_scene(scene, rng, image_size)
        for subtask, pair in _yes_no_pairs(scene, rng).items():
            folder = out / "mme" / subtask
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:04d}.png")
            (folder / f"{i:04d}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pair))
            n_q += 2
    return {"train_seed": out / "train_seed.json", "train_llava": out / "train_llava.json",
            "heldout": out / "heldout.json", "mme": out / "mme", "train_rows": n_train, "heldout_questions": n_heldout,
            "mme_questions": n_q}
