"""The offline demo end to end on a reduced budget (--fast): real SmolLM2 LLM, synthetic data, held-out accuracy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FAST_MIN_ACCURACY = 0.5  # measured 0.617 here (140 steps, 60 questions); an 80-step run gave 0.217


def test_demo_fast_learns_to_answer_about_images(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minigpt4qwen", "demo", "--fast", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    run_line, acc_line = lines[-2], lines[-1]
    assert run_line.startswith("run directory: ") and Path(run_line.split(": ", 1)[1]).is_dir()
    m = re.fullmatch(r"held-out accuracy: (\d\.\d+) on (\d+) questions", acc_line)
    assert m, acc_line
    assert int(m.group(2)) >= 50
    assert float(m.group(1)) >= FAST_MIN_ACCURACY, out.stdout[-2000:]
