"""scripts/gpu_faults.py on CPU: kill -9 of one FSDP2 rank mid-run (LoRA dropout + augmentation on), a planted
half-written checkpoint, then `train --resume` under the same launcher continues bit-identically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fault_drill_fsdp_kill_one_rank_resumes_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_faults.py"), "--cpu", "--engines", "fsdp",
                           "--out", str(tmp_path)], check=False, capture_output=True, text=True, env=env,
                          timeout=600)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = lines[0]
    assert rec["killed"] == "rank 1" and rec["killed_rc"] != [0]  # the launcher saw its worker die
    assert rec["planted"] not in rec["resumed_from"] and "step-00000006" in rec["resumed_from"]
    assert rec["steps_compared"] and rec["exact"] and rec["still_complete"] and rec["steps_after_resume"] == 14
    run = tmp_path / "fsdp-1x2" / "run"
    assert (run / "checkpoints" / rec["planted"]).is_dir()  # left alone: only complete checkpoints are used
