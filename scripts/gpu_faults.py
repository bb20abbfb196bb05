"""Fault drill: kill -9 one rank (or one whole node) mid-run, then `minigpt4qwen train --resume` under the same
launcher, for every engine. Prints one JSON line per engine and a verdict.

    python scripts/gpu_faults.py --out /tmp/faults                          # 2 GPUs per run: ddp zero2 zero3 fsdp
    python scripts/gpu_faults.py --nodes 2 --engines ddp,zero3              # 2 "nodes" x 2 GPUs, c10d rendezvous
    python scripts/gpu_faults.py --cpu --engines ddp,fsdp                   # the same drill on CPU (gloo, tiny)

Each run trains LoRA on the LLM with dropout 0.1 and crop/flip augmentation on (every random stream must resume
where it was), saves every 3 steps and keeps all checkpoints. When K >= 8 steps are logged, one worker process
(local rank 1 of the last node) gets SIGKILL; torchrun's agent then stops the others. With --nodes 2 the last
node's launcher and its workers are killed together (a node failure). Before the resume the drill plants what a
kill in the middle of a save leaves behind: a `step-N` directory without meta.json that `latest` names, and a
`.step-N.tmp` directory. Checks, per engine:
  - the resume starts from the newest complete checkpoint (never the planted half-written one) and finishes;
  - the loss of every step logged before the kill after that checkpoint equals the resumed run's loss at the same
    step (same data order, optimizer, schedule, RNG) within --tolerance (relative; bf16 on GPU, 0 expected on CPU);
  - every checkpoint complete before the kill is still there and complete.
Ports of 2 runs at a time on a 4-GPU host (GPUs 0-1, 2-3); --nodes 2 uses all four.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ENGINES = {"ddp": ["engine.name=ddp"], "zero2": ["engine.name=deepspeed", "engine.zero_stage=2"],
           "zero3": ["engine.name=deepspeed", "engine.zero_stage=3"], "fsdp": ["engine.name=fsdp"]}
RANDOM = ["model.trainable.llm=lora", "model.lora.dropout=0.1", "data.random_resized_crop=true", "data.hflip=true"]
GPU_MODEL = ["model.vision=eva-vit-g", "model.qformer=blip2-qformer", "model.llm=random:qwen-7b",
             "train.precision=bf16", "train.batch_size=4", "data.max_txt_len=160"]
CPU_MODEL = ["model.vision=tiny", "model.qformer=tiny", "model.num_query_tokens=4", "model.llm=random:tiny-qwen2",
             "train.precision=fp32", "train.device=cpu", "train.batch_size=2", "data.max_txt_len=96"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (torchrun's workers; each in its own session). Used by tests too."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _local_rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"LOCAL_RANK="):
            return int(item.split(b"=", 1)[1])
    return None


def _rows(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []


class Launch:
    """One run under torchrun: `nodes` launchers (c10d rendezvous) of `per_node` processes each."""

    def __init__(self, args, name: str, gpus: list[int]):
        self.args, self.name, self.gpus = args, name, gpus
        self.out = Path(args.out)
        self.run = self.out / name / "run"
        self.procs: list[subprocess.Popen] = []

    def start(self, train_args: list[str], tag: str) -> None:
        nodes, per_node = self.args.nodes, self.args.per_node
        port = _port()
        self.procs = []
        for node in range(nodes):
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
                   "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
            if not self.args.cpu:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpus[node * per_node:(node + 1) * per_node]))
            rdzv = [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                    f"--rdzv_id={self.name}-{tag}"] if nodes > 1 else [f"--master_port={port}"]
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={per_node}", *rdzv,
                   "-m", "minigpt4qwen", "train", *train_args]
            log = open(self.out / f"{self.name}-{tag}-node{node}.log", "w")  # noqa: SIM115 - lives as long as the run
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True))

    def kill_when(self, steps: int, timeout: float) -> dict:
        """SIGKILL local rank 1 of the last node (or, with several nodes, that node's launcher and all its
        workers) once `steps` steps are logged."""
        deadline = time.time() + timeout
        while time.time() < deadline and all(p.poll() is None for p in self.procs):
            if len(_rows(self.run)) >= steps:
                last = self.procs[-1]
                workers = children(last.pid)
                if self.args.nodes > 1:
                    victims = [*workers, last.pid]
                else:
                    victims = [w for w in workers if _local_rank(w) == 1][:1]
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
                return {"killed_after_steps": len(_rows(self.run)), "killed": "node" if self.args.nodes > 1 else
                        "rank 1"}
            time.sleep(0.05)
        return {"killed_after_steps": None, "error": "the run ended or timed out before the kill"}

    def wait(self, timeout: float) -> list[int]:
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                codes.append(p.wait())
        return codes


def plant_half_written(run: Path, newest: int) -> str:
    """What a kill during a save leaves: a step dir without meta.json that `latest` names, and a .tmp dir."""
    root = run / "checkpoints"
    fake = root / f"step-{newest + 1:08d}"
    shutil.copytree(root / f"step-{newest:08d}", fake)
    (fake / "meta.json").unlink()
    (root / f".step-{newest + 2:08d}.tmp").mkdir()
    (root / "latest").write_text(fake.name)
    return fake.name


def drill(args, engine: str, gpus: list[int]) -> dict:
    from minigpt4qwen.runs import complete_checkpoints, is_complete

    name = f"{engine}-{args.nodes}x{args.per_node}"
    launch = Launch(args, name, gpus)
    shutil.rmtree(launch.out / name, ignore_errors=True)
    model = CPU_MODEL if args.cpu else GPU_MODEL
    overrides = [f"train.output_dir={launch.run}", f"data.train=[{{path: {args.data / 'train_seed.json'}}}]",
                 *model, *RANDOM, *ENGINES[engine], f"train.max_steps={args.steps}", "train.save_every_steps=3",
                 "train.keep_last=0", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1",
                 "train.save_every_epochs=0"]
    from minigpt4qwen.config import load_config, save_config

    cfg_file = launch.out / f"{name}.yaml"
    save_config(load_config(None, overrides), cfg_file)
    t0 = time.time()
    launch.start(["--config", str(cfg_file)], "killed")
    rec: dict = {"engine": engine, "nodes": args.nodes, "procs_per_node": args.per_node,
                 **launch.kill_when(args.kill_after, args.timeout)}
    rec["killed_rc"] = launch.wait(args.timeout)
    before = {r["step"]: r["loss"] for r in _rows(launch.run)}
    root = launch.run / "checkpoints"
    saved = [p.name for p in complete_checkpoints(root)]
    rec["complete_before_kill"] = saved
    if not saved or rec["killed_after_steps"] is None:
        rec["ok"] = False
        return rec
    newest = int(saved[-1].split("-")[1])
    rec["planted"] = plant_half_written(launch.run, newest)
    launch.start(["--resume", str(launch.run)], "resume")
    rec["resume_rc"] = launch.wait(args.timeout)
    text = "".join((launch.out / f"{name}-resume-node{n}.log").read_text() for n in range(args.nodes))
    rec["resumed_from"] = next((ln.split("resumed from ", 1)[1].strip() for ln in text.splitlines()
                                if "resumed from " in ln), None)
    after = {r["step"]: r["loss"] for r in _rows(launch.run)}
    overlap = sorted(s for s in before if s > newest and s in after)
    diffs = [abs(after[s] - before[s]) / max(abs(before[s]), 1e-12) for s in overlap]
    rec.update({
        "steps_compared": overlap, "max_rel_diff": max(diffs) if diffs else None,
        "exact": bool(diffs) and max(diffs) == 0.0, "steps_after_resume": len(after),
        "still_complete": all(is_complete(root / s) for s in saved), "seconds": round(time.time() - t0, 1)})
    rec["ok"] = (rec["resume_rc"] == [0] * args.nodes and rec["resumed_from"] is not None
                 and f"step-{newest:08d}" in rec["resumed_from"] and rec["steps_after_resume"] == args.steps
                 and bool(overlap) and rec["max_rel_diff"] <= args.tolerance and rec["still_complete"])
    if not rec["ok"]:
        rec["log_tail"] = text[-1500:]
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/minigpt4qwen-faults")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--nodes", type=int, default=1, help="launchers joined by the c10d rendezvous ('nodes')")
    p.add_argument("--per-node", type=int, default=2, help="processes (GPUs) per node")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--kill-after", type=int, default=8, help="kill once this many steps are logged")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative loss difference at the same step (default: 0 on CPU, 2e-2 on GPU in bf16)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--cpu", action="store_true", help="tiny model on CPU with gloo")
    args = p.parse_args()
    args.tolerance = args.tolerance if args.tolerance is not None else (0.0 if args.cpu else 2e-2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.data = out / "data"
    if not (args.data / "train_seed.json").is_file():
        from minigpt4qwen.data.synthetic import write_dataset

        write_dataset(args.data, n_train=256, n_heldout=4, seed=0)
    n_gpu = 0 if args.cpu else __import__("torch").cuda.device_count()
    per_run = args.nodes * args.per_node
    slots = 1 if args.cpu else max(n_gpu // per_run, 1)
    engines = [e for e in args.engines.split(",") if e]
    results = []
    for w in range(0, len(engines), slots):
        from concurrent.futures import ThreadPoolExecutor

        wave = engines[w:w + slots]
        with ThreadPoolExecutor(len(wave)) as pool:
            futures = [pool.submit(drill, args, e, list(range(i * per_run, (i + 1) * per_run)))
                       for i, e in enumerate(wave)]
            for f in futures:
                rec = f.result()
                results.append(rec)
                print(json.dumps(rec), flush=True)
    ok = all(r["ok"] for r in results)
    print(json.dumps({"all_ok": ok, "tolerance": args.tolerance,
                      "max_rel_diff": {r["engine"]: r.get("max_rel_diff") for r in results}}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
