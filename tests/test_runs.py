"""Run directories: relocatable config paths, loading from any working directory, complete checkpoints only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_OVERRIDES
from safetensors.torch import save_file

from minigpt4qwen.config import load_config, save_config
from minigpt4qwen.runs import (
    META,
    STATE,
    WEIGHTS,
    find_run,
    latest_checkpoint,
    load_run,
    read_run_config,
    save_checkpoint,
    save_run_config,
)

QUERY = "What color is the shape?"


def _stored(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_config_paths_are_stored_run_relative_or_absolute_and_resolve_from_anywhere(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "runs/r/parts").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(None, [
        "model.llm=random:tiny-qwen2", "model.tokenizer=runs/r/parts/tok", "model.vision_checkpoint=../shared/v",
        "model.projector_checkpoint=runs/r/parts/p.safetensors", f"model.blip2_checkpoint={tmp_path / 'b.pth'}",
        "data.train=[{path: data/a.json}, {path: data/b.json, image_root: imgs}]", "eval.mme_root=mme",
        "train.output_dir=runs/r",
    ])
    save_run_config(cfg, "runs/r")
    stored = _stored(work / "runs/r")
    assert stored["model"]["tokenizer"] == "parts/tok"  # inside the run: relative to it
    assert stored["model"]["projector_checkpoint"] == "parts/p.safetensors"
    assert stored["model"]["vision_checkpoint"] == str(tmp_path / "shared/v")  # outside: absolute, normalised
    assert stored["model"]["blip2_checkpoint"] == str(tmp_path / "b.pth")
    assert [d["path"] for d in stored["data"]["train"]] == [str(work / "data/a.json"), str(work / "data/b.json")]
    assert [d["image_root"] for d in stored["data"]["train"]] == ["", str(work / "imgs")]  # "" keeps its meaning
    assert stored["eval"]["mme_root"] == str(work / "mme") and stored["train"]["output_dir"] == "."
    assert stored["model"]["llm"] == "random:tiny-qwen2"  # a name, not a path

    monkeypatch.chdir(elsewhere)
    back = read_run_config(work / "runs/r")
    assert back.model.tokenizer == str(work / "runs/r/parts/tok") and back.train.output_dir == str(work / "runs/r")
    assert back.model.vision_checkpoint == str(tmp_path / "shared/v") and back.eval.mme_root == str(work / "mme")
    # a resume's overrides come from the command line: relative to the working directory, as given
    assert read_run_config(work / "runs/r", ["eval.mme_root=other"]).eval.mme_root == "other"
    # a re-save (a resume does one) writes the same file
    before = (work / "runs/r/config.yaml").read_text()
    save_run_config(back, work / "runs/r")
    assert (work / "runs/r/config.yaml").read_text() == before

    moved = shutil.move(work / "runs/r", tmp_path / "moved")
    again = read_run_config(moved)
    assert again.model.tokenizer == str(tmp_path / "moved/parts/tok")  # inside: travels with the run
    assert again.model.vision_checkpoint == str(tmp_path / "shared/v") and again.train.output_dir == str(moved)


def test_runs_written_before_run_relative_paths_still_resolve(tmp_path, monkeypatch):
    """Older runs kept paths relative to the folder training started in (and older exports relative to themselves)."""
    work = tmp_path / "work"
    (work / "demo_runs/demo/run/llm").mkdir(parents=True)
    (work / "demo_runs/demo/vision").mkdir()
    monkeypatch.chdir(work)
    save_config(load_config(None, [
        "train.output_dir=demo_runs/demo/run", "model.vision_checkpoint=demo_runs/demo/vision", "model.llm=llm",
        "eval.mme_root=nowhere/mme",
    ]), "demo_runs/demo/run/config.yaml")
    monkeypatch.chdir(tmp_path)
    cfg = read_run_config(work / "demo_runs/demo/run")
    assert cfg.model.vision_checkpoint == str(work / "demo_runs/demo/vision")  # the folder it was started in
    assert cfg.model.llm == str(work / "demo_runs/demo/run/llm")  # an old export's part inside the run
    assert cfg.eval.mme_root == "nowhere/mme"  # found nowhere: the working directory, as before


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory, shapes_data) -> Path:
    """A tiny run trained from its own folder with relative paths only: one part outside the run (a sibling folder,
    as the demo's vision weights) and one inside it."""
    from minigpt4qwen.models.minigpt4qwen import build_model
    from minigpt4qwen.train.loop import train

    work = tmp_path_factory.mktemp("relwork")
    (work / "data").symlink_to(shapes_data, target_is_directory=True)
    cfg = load_config(None, [*TINY_OVERRIDES, "train.max_steps=2", "train.save_every_steps=1"])
    model = build_model(cfg.model).model
    gen = torch.Generator().manual_seed(5)
    (work / "parts").mkdir()
    save_file({"query_tokens": torch.randn(model.query_tokens.shape, generator=gen)},
              str(work / "parts/vision.safetensors"))
    (work / "runs/r/init").mkdir(parents=True)
    save_file({k: torch.randn(v.shape, generator=gen) for k, v in model.llm_proj.state_dict().items()},
              str(work / "runs/r/init/projector.safetensors"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        run = train(load_config(None, [
            *TINY_OVERRIDES, "train.max_steps=2", "train.save_every_steps=1", "train.output_dir=runs/r",
            "data.train=[{path: data/train_seed.json}, {path: data/train_llava.json}]",
            "model.vision_checkpoint=parts/vision.safetensors",
            "model.projector_checkpoint=runs/r/init/projector.safetensors",
        ]))
    assert not run.is_absolute()
    return work / run


def _answer(run: Path, image: Path) -> str:
    from minigpt4qwen.data.conversation import IMAGE_PROMPT, Turn
    from minigpt4qwen.serve.generate import Assistant, GenerationSettings

    assistant = Assistant.from_run(run, device="cpu")
    return assistant.generate([[Turn("user", f"{IMAGE_PROMPT} {QUERY}")]], [[image]], GenerationSettings(6))[0]


def test_trained_run_chats_and_evaluates_from_another_folder(relative_run, shapes_data, tmp_path, monkeypatch):
    from minigpt4qwen.__main__ import main

    stored = _stored(relative_run)
    assert stored["model"]["projector_checkpoint"] == "init/projector.safetensors"
    assert stored["train"]["output_dir"] == "."
    assert stored["model"]["vision_checkpoint"] == str(relative_run.parents[1] / "parts/vision.safetensors")

    image = (shapes_data / "images/heldout_00000.png").resolve()
    monkeypatch.chdir(relative_run.parents[1])
    reference = _answer(Path("runs/r"), image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = subprocess.run([sys.executable, "-m", "minigpt4qwen", "chat", "--checkpoint", str(relative_run), "--image",
                          str(image), "--query", QUERY, "--max-new-tokens", "6"],
                         capture_output=True, text=True, cwd=elsewhere, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == reference

    ckpt = latest_checkpoint(relative_run)
    assert main(["eval", "mme", "--checkpoint", str(ckpt), "--mme-root", str(shapes_data / "mme"),
                 "--max-new-tokens", "2", "--batch-size", "8"]) == 0
    assert (relative_run / "eval" / f"mme-{ckpt.name}" / "summary.json").is_file()  # the run's eval/, not cwd's
    assert not (elsewhere / "eval").exists()


def test_moved_run_still_chats(relative_run, shapes_data, tmp_path, monkeypatch, capsys):
    from minigpt4qwen.__main__ import main

    image = (shapes_data / "images/heldout_00000.png").resolve()
    reference = _answer(relative_run, image)
    moved = Path(shutil.copytree(relative_run, tmp_path / "new/place"))
    shutil.move(relative_run, tmp_path / "gone")  # the original location no longer exists
    try:
        monkeypatch.chdir(tmp_path)
        run = load_run(moved, "cpu")
        assert run.run_dir == moved and run.cfg.model.projector_checkpoint == str(moved / "init/projector.safetensors")
        assert run.checkpoint.parent == moved / "checkpoints"
        capsys.readouterr()
        assert main(["chat", "--checkpoint", str(moved), "--image", str(image), "--query", QUERY,
                     "--max-new-tokens", "6"]) == 0
        assert capsys.readouterr().out.strip() == reference
    finally:
        shutil.move(tmp_path / "gone", relative_run)


# --------------------------------------------------------------------------------------------- checkpoints


def _save(run: Path, step: int, keep_last: int = 0) -> Path:
    return save_checkpoint(run, step, {"w": torch.full((2,), float(step))}, {"step": step}, {"step": step},
                           keep_last)


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def test_incomplete_checkpoint_is_never_picked(tmp_path):
    run = tmp_path / "run"
    (run / "config.yaml").parent.mkdir()
    (run / "config.yaml").write_text("{}\n")
    for step in (1, 2):
        _save(run, step)
    only_weights = run / "checkpoints/step-00000003"
    shutil.copytree(run / "checkpoints/step-00000002", only_weights)
    (only_weights / STATE).unlink()
    (only_weights / META).unlink()
    no_mark = shutil.copytree(run / "checkpoints/step-00000002", run / "checkpoints/step-00000004")
    (no_mark / META).unlink()  # the writer writes meta.json last: without it the rest may be partial
    for pointer in ("step-00000004", "step-00000003", None):
        if pointer is None:
            (run / "checkpoints/latest").unlink()
        else:
            (run / "checkpoints/latest").write_text(pointer)
        assert latest_checkpoint(run) == run / "checkpoints/step-00000002"
        assert find_run(run)[1] == run / "checkpoints/step-00000002"
    (run / "checkpoints/latest").write_text("step-00000001")  # complete: what `latest` names wins
    assert latest_checkpoint(run) == run / "checkpoints/step-00000001"
    for step in (1, 2):
        shutil.rmtree(run / f"checkpoints/step-{step:08d}")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_run(run)


def test_resume_skips_a_checkpoint_without_training_state(tmp_path, shapes_data):
    from conftest import tiny_config

    from minigpt4qwen.train.loop import train

    run = train(tiny_config(tmp_path, shapes_data, "train.max_steps=3", "train.save_every_steps=1",
                            "train.keep_last=3"))
    (run / "checkpoints/step-00000003" / STATE).unlink()  # as if the copy or the deletion of step 3 stopped half-way
    (run / "checkpoints/latest").unlink()
    assert train(resume=run) == run  # resumes from step 2 and redoes step 3 instead of crashing on the stray one
    assert (run / "checkpoints/latest").read_text() == "step-00000003"
    assert (run / "checkpoints/step-00000003" / STATE).is_file()
    assert len((run / "log.jsonl").read_text().splitlines()) == 3


def test_keep_last_counts_complete_checkpoints_and_never_deletes_latest(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        _save(run, step)
    stray = run / "checkpoints/step-00000009"
    stray.mkdir()
    save_file({"w": torch.zeros(2)}, str(stray / WEIGHTS))  # incomplete: neither counted nor deleted
    _save(run, 3, keep_last=2)
    assert _steps(run) == ["step-00000002", "step-00000003", "step-00000009"]

    # a newer complete checkpoint than the one `latest` names (a kill between the rename and the pointer): the
    # resumed run saves step 4, which is not among the newest `keep_last` but is what `latest` now names
    _save(run, 6)
    _save(run, 4, keep_last=1)
    assert (run / "checkpoints/latest").read_text() == "step-00000004"
    assert _steps(run) == ["step-00000004", "step-00000006", "step-00000009"]
    assert latest_checkpoint(run) == run / "checkpoints/step-00000004"
    assert not list((run / "checkpoints").glob(".*"))  # no temporary or half-deleted directories left
