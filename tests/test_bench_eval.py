"""`bench eval --suite`: the `eval all` path timed on synthetic files in the official layouts (tiny preset on CPU here;
the real run is `bench eval --suite all --preset 7b` on a GPU). No timing is asserted."""

from __future__ import annotations

import json

import pytest
from test_bench import _one_thread  # noqa: F401  (autouse: one thread for tiny matrices on a busy CPU)

from minigpt4qwen import bench
from minigpt4qwen.bench.eval import image_pool, write_mmbench, write_mme, write_pope
from minigpt4qwen.eval import mmbench
from minigpt4qwen.eval.suite import read_suite


def test_bench_eval_suite_all_on_cpu(tmp_path):
    out, data = tmp_path / "bench.jsonl", tmp_path / "data"
    assert bench.main(["eval", "--suite", "all", "--preset", "tiny", "--device", "cpu", "--mme-questions", "4",
                       "--pope-questions", "2", "--mmbench-questions", "2", "--eval-batch", "4",
                       "--eval-new-tokens", "2", "--image-px", "24", "--data-dir", str(data), "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in recs] == ["setup", "eval-mme", "eval-pope", "eval-mmbench", "eval-total"]
    by = {r["variant"]: r for r in recs}
    assert (by["eval-mme"]["questions"], by["eval-mme"]["asked"]) == (4, 4)
    assert (by["eval-pope"]["questions"], by["eval-pope"]["asked"]) == (6, 6)  # 2 per split x 3 splits
    assert (by["eval-mmbench"]["questions"], by["eval-mmbench"]["asked"]) == (2, 8)  # 4 options each: 4 rotations
    assert by["eval-pope"]["max_new_tokens"] == 2 and by["eval-mme"]["batch_size"] == 4
    for name in ("mme", "pope", "mmbench"):  # where the time went: the phases add up to the benchmark's time
        r = by[f"eval-{name}"]
        assert r["prepare_s"] > 0 and r["text_s"] > 0 and r["decode_s"] == 0  # CPU: HF generate, not FastDecoder
        assert r["prepare_s"] + r["text_s"] + r["decode_s"] + r["other_s"] == pytest.approx(r["total_s"], abs=1e-5)
    total = by["eval-total"]
    assert total["asked"] == 18 and total["benchmarks"] == ["mme", "pope", "mmbench"] and "error" not in total
    combined = json.loads((data / "out" / "summary.json").read_text())  # what `eval all` writes
    assert {name: r["asked"] for name, r in combined["benchmarks"].items()} == {"mme": 4, "pope": 6, "mmbench": 8}


def test_official_size_files_in_official_layouts(tmp_path):
    pool = image_pool(2, 16, seed=0)
    pope_root, images = write_pope(tmp_path / "POPE", 3000, pool)
    suite = read_suite(write_mme(tmp_path / "MME", 2374, pool), pope_root, images,
                       mmbench_tsv=write_mmbench(tmp_path / "mmbench_dev.tsv", 4377, pool))
    # questions per subtask of the released MME
    assert {name: len(items) for name, items in suite.mme.items()} == {
        "existence": 60, "count": 60, "position": 60, "color": 60, "posters": 294, "celebrity": 340, "scene": 400,
        "landmark": 400, "artwork": 400, "OCR": 40, "commonsense_reasoning": 140, "numerical_calculation": 40,
        "text_translation": 40, "code_reasoning": 40}
    assert (tmp_path / "MME" / "artwork" / "questions_answers_YN" / "0000.txt").is_file()
    assert (tmp_path / "MME" / "OCR" / "0000.txt").is_file() and (tmp_path / "MME" / "OCR" / "0000.jpg").is_file()
    assert {split: len(qs) for split, qs in suite.pope.items()} == {"random": 3000, "popular": 3000,
                                                                    "adversarial": 3000}
    assert len({q.image for q in suite.pope["random"]}) == 500  # 6 questions per COCO image, as in POPE
    assert len(suite.mmbench) == 4377
    # options 4, 4, 3, 2 in turn: 1094 full cycles of 13 rotations, then one question with 4
    assert sum(len(mmbench.rotations(q)) for q in suite.mmbench) == 1094 * 13 + 4
