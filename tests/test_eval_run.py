"""Benchmarks on a checkpoint through the shared generation path, from the CLI and during training."""

from __future__ import annotations

import json

import yaml
from conftest import TINY_OVERRIDES, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_mmbench import _write_tsv
from test_pope import _write_pope

from minigpt4qwen.__main__ import main
from minigpt4qwen.eval.mme import read_mme, score_answer_dir
from minigpt4qwen.eval.training import training_evaluator
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


def test_benchmarks_every_epoch_during_training(tmp_path, shapes_data):
    pope_root, images = _write_pope(tmp_path)
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv")
    cfg = tiny_config(tmp_path, shapes_data, "train.epochs=1", "train.max_steps=-1", "train.batch_size=8",
                      "train.grad_accum=4", f"eval.mme_root={shapes_data / 'mme'}", f"eval.pope_root={pope_root}",
                      f"eval.pope_images={images}", "eval.pope_splits=[adversarial]", f"eval.mmbench_tsv={tsv}",
                      "eval.every_n_epochs=1", "eval.max_new_tokens=2")
    run = train(cfg, evaluate=training_evaluator(cfg))  # what `minigpt4qwen train` passes
    (evaldir,) = (run / "eval").iterdir()
    assert evaldir.name.startswith("step-")
    combined = json.loads((evaldir / "summary.json").read_text())
    assert list(combined["benchmarks"]) == ["mme", "pope", "mmbench"]
    assert list(combined["benchmarks"]["pope"]["summary"]["splits"]) == ["adversarial"]
    assert (evaldir / "mme" / "existence.txt").is_file() and (evaldir / "mmbench" / "answers.jsonl").is_file()
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"mme/perception", "pope/adversarial/f1", "pope/average/accuracy", "mmbench/overall",
            "mmbench/category/color", "eval/seconds/pope", "train/loss"} <= tags
    (event,) = acc.Scalars("mmbench/overall")
    assert event.value == combined["benchmarks"]["mmbench"]["summary"]["overall"]


def test_no_benchmark_no_hook(tmp_path, shapes_data):
    assert training_evaluator(tiny_config(tmp_path, shapes_data)) is None
    cfg = tiny_config(tmp_path, shapes_data, f"eval.mme_root={shapes_data / 'mme'}")  # every_n_epochs stays 0
    assert training_evaluator(cfg) is None


def test_train_checks_benchmark_files_before_training(tmp_path, shapes_data, capsys):
    pope_root, images = _write_pope(tmp_path)
    (pope_root / "output" / "coco" / "coco_pope_random.json").write_text('{"question_id": 1, "image": 3}\n')
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"eval": {"every_n_epochs": 1, "pope_root": str(pope_root),
                                               "pope_images": str(images)}}))
    code = main(["train", "--config", str(config), *TINY_OVERRIDES, f"train.output_dir={tmp_path / 'run'}",
                 f"data.train=[{{path: {shapes_data / 'train_seed.json'}}}]"])
    err = capsys.readouterr().err
    assert code == 2 and "coco_pope_random.json:1: field 'image' must be str" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
