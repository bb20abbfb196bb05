"""MME evaluation of a checkpoint through the shared generation path, from the CLI and during training."""

from __future__ import annotations

import json

from conftest import tiny_config

from minigpt4qwen.__main__ import main
from minigpt4qwen.eval.mme import read_mme, score_answer_dir
from minigpt4qwen.eval.run import mme_during_training
from minigpt4qwen.train.loop import train


def test_eval_mme_cli_writes_rescorable_results(tiny_run, shapes_data, tmp_path, capsys):
    out = tmp_path / "mme"
    assert main(["eval", "mme", "--checkpoint", str(tiny_run), "--mme-root", str(shapes_data / "mme"),
                 "--out", str(out), "--max-new-tokens", "3", "--batch-size", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    items = read_mme(shapes_data / "mme")
    for name, rows in items.items():
        lines = (out / f"{name}.txt").read_text().splitlines()
        assert len(lines) == len(rows)
        assert [ln.split("\t")[1] for ln in lines] == [r.question for r in rows]  # order as read
    rescored = score_answer_dir(out)
    assert rescored["perception"] == summary["perception"] and rescored["subtasks"] == summary["subtasks"]
    assert "Perception" in capsys.readouterr().out and (out / "scores.png").is_file()


def test_mme_every_epoch_during_training(tmp_path, shapes_data):
    cfg = tiny_config(tmp_path, shapes_data, "train.epochs=1", "train.max_steps=-1", "train.batch_size=8",
                      "train.grad_accum=4", f"eval.mme_root={shapes_data / 'mme'}", "eval.every_n_epochs=1",
                      "eval.max_new_tokens=2")
    run = train(cfg, evaluate=mme_during_training)  # what `minigpt4qwen train` passes
    (evaldir,) = (run / "eval").iterdir()
    assert json.loads((evaldir / "summary.json").read_text())["subtasks"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert "mme/perception" in acc.Tags()["scalars"] and "train/loss" in acc.Tags()["scalars"]
