"""Engines on CPU with gloo: 2-process DDP, DeepSpeed ZeRO-2/3 and FSDP2 runs match the single-process run, resume
exactly after kill -9, and always leave one trainable.safetensors. Plus LoRA (stage 2), llm_lr and helper checks.

Each multi-process run is `torchrun --nproc_per_node=2 -m minigpt4qwen train` in a subprocess. DeepSpeed's first
CPU run compiles its shm extension (~1-3 min on 2 cores, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_train import RANDOM_PARTS

from minigpt4qwen.config import Config, ConfigError, load_config, save_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from gpu_faults import children  # noqa: E402 - the drill's own process lookup, shared with these CPU kills
from minigpt4qwen.runs import WEIGHTS, consolidate, latest_checkpoint, load_weights
from minigpt4qwen.train.engines import deepspeed_config, merge_lora, oom_hint, param_groups
from minigpt4qwen.train.loop import train

# the global batch is 8 samples in 2 micro-batches: 1 process x 4 x accum 2 == 2 processes x 2 x accum 2
STEPS = 12
COMMON = [f"train.max_steps={STEPS}", "train.grad_accum=2", "train.save_every_steps=3", "train.keep_last=0"]
# sums over the global batch are added in another order across ranks: equal to ~1e-7 here
PARITY = {"rel": 1e-5, "abs": 1e-6}

def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}"]
    return [*launcher, "-m", "minigpt4qwen", "train", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _run(args: list[str], log: Path) -> None:
    for attempt in range(2):
        with open(log, "w") as f:
            proc = subprocess.run(args, check=False, stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=400)
        text = log.read_text()
        # the free port picked by _port() can be taken before torchrun binds it: retry once on a new one
        if proc.returncode == 0 or attempt or "ddress already in use" not in text:
            break
        args = [f"--master_port={_port()}" if a.startswith("--master_port=") else a for a in args]
    assert proc.returncode == 0, text[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shapes_data) -> list[float]:
    """The single-process run every engine must match."""
    tmp = tmp_path_factory.mktemp("single")
    return losses(train(tiny_config(tmp, shapes_data, *COMMON, "train.batch_size=4")))


def _config(tmp: Path, data: Path, name: str, *extra: str) -> tuple[Path, Path]:
    cfg = tiny_config(tmp / name, data, *COMMON, "train.batch_size=2", *extra)
    save_config(cfg, tmp / f"{name}.yaml")
    return tmp / f"{name}.yaml", Path(cfg.train.output_dir)


def _kill_mid_run(cfg_file: Path, run: Path, after_steps: int, log: Path) -> int:
    """Start a 2-process run and SIGKILL the launcher and both workers (a node failure) mid-epoch."""
    with open(log, "w") as f:
        proc = subprocess.Popen(_torchrun("--config", str(cfg_file)), stdout=f, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().count("\n") >= after_steps:
            for pid in [*children(proc.pid), proc.pid]:  # torchrun starts each worker in its own session
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed:\n" + log.read_text()
    done = len(losses(run))
    assert done < STEPS
    time.sleep(0.5)  # workers may take a moment to disappear after SIGKILL
    return done


def _kill_and_resume(tmp: Path, data: Path, name: str, *extra: str) -> list[float]:
    cfg_file, run = _config(tmp, data, name, *extra)
    done = _kill_mid_run(cfg_file, run, 5, tmp / f"{name}-killed.log")
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and 3 <= int(ckpt.name.split("-")[1]) <= done
    _run(_torchrun("--resume", str(run)), tmp / f"{name}-resume.log")
    return losses(run)


def test_ddp_two_processes_match_single_and_resume_exactly_after_kill(tmp_path, shapes_data, reference):
    cfg_file, run = _config(tmp_path, shapes_data, "ddp")
    _run(_torchrun("--config", str(cfg_file)), tmp_path / "ddp.log")
    full = losses(run)
    assert full == pytest.approx(reference, **PARITY)
    assert set(load_weights(latest_checkpoint(run))) == {"llm_proj.weight", "llm_proj.bias"}
    # with LoRA dropout and augmentation on: every rank's RNG must continue where it was
    cfg_file, run = _config(tmp_path, shapes_data, "ddp-random", *RANDOM_PARTS)
    _run(_torchrun("--config", str(cfg_file)), tmp_path / "ddp-random.log")
    resumed = _kill_and_resume(tmp_path, shapes_data, "ddp-killed", *RANDOM_PARTS)
    assert resumed == losses(run)  # bit-identical continuation: same data order, optimizer, schedule, RNG


@pytest.mark.slow
def test_deepspeed_zero2_matches_single_and_resumes_after_kill(tmp_path, shapes_data, reference):
    pytest.importorskip("deepspeed")
    resumed = _kill_and_resume(tmp_path, shapes_data, "zero2", "engine.name=deepspeed", "engine.zero_stage=2")
    assert resumed == pytest.approx(reference, **PARITY)  # killed at step >= 5, resumed from its checkpoint
    ckpt = latest_checkpoint(tmp_path / "zero2" / "run")
    assert (ckpt / "deepspeed").is_dir() and (ckpt / WEIGHTS).is_file()


@pytest.mark.slow
def test_deepspeed_zero3_matches_single_and_consolidates(tmp_path, shapes_data, reference):
    pytest.importorskip("deepspeed")
    cfg_file, run = _config(tmp_path, shapes_data, "zero3", "engine.name=deepspeed", "engine.zero_stage=3")
    _run(_torchrun("--config", str(cfg_file)), tmp_path / "zero3.log")
    assert losses(run) == pytest.approx(reference, **PARITY)
    ckpt = latest_checkpoint(run)
    gathered = load_file(str(ckpt / WEIGHTS))  # written by rank 0 from the partitioned parameters
    (ckpt / WEIGHTS).unlink()
    rebuilt = load_file(str(consolidate(run)))  # from the ZeRO-3 shards alone (zero_to_fp32)
    assert set(rebuilt) == set(gathered) == {"llm_proj.weight", "llm_proj.bias"}
    assert all(torch.equal(rebuilt[k], gathered[k]) for k in gathered)


def test_deepspeed_zero3_full_llm_with_torch_linear_matches_single(tmp_path, shapes_data):
    """Stage 2 under ZeRO-3: the LLM's own weights partitioned, gathered for forward and again for backward through
    torch's linear (memory_efficient_linear off, see test_zero3_keeps_torch_linear_unless_asked): same losses."""
    pytest.importorskip("deepspeed")
    short = ["train.max_steps=4", "train.grad_accum=2", "train.save_every_steps=0", "train.save_every_epochs=0",
             "model.trainable.llm=full"]
    single = losses(train(tiny_config(tmp_path / "single", shapes_data, *short, "train.batch_size=4")))
    cfg_file, run = _config(tmp_path, shapes_data, "zero3-full", *short, "engine.name=deepspeed",
                            "engine.zero_stage=3")
    _run(_torchrun("--config", str(cfg_file)), tmp_path / "zero3-full.log")
    assert single[-1] < single[0]  # the LLM trains
    assert losses(run) == pytest.approx(single, **PARITY)


def test_fsdp2_matches_single_and_resumes_from_sharded_state(tmp_path, shapes_data, reference):
    # the default engine.async_stager=prefault: the async saves copy into the buffers `prefaulted_stager` made after
    # the first step (the copy path of `direct` too), so the exact resume below checks what they staged; the last
    # run takes engine.async_stager=dcp (DCP's own fresh copy on CPU)
    cfg_file, run = _config(tmp_path, shapes_data, "fsdp", "engine.name=fsdp")
    _run(_torchrun("--config", str(cfg_file)), tmp_path / "fsdp.log")
    assert "checkpoint buffers:" in (run / "train.log").read_text()
    full = losses(run)
    assert full == pytest.approx(reference, **PARITY)
    ckpt = latest_checkpoint(run)
    assert (ckpt / "fsdp").is_dir() and set(load_weights(ckpt)) == {"llm_proj.weight", "llm_proj.bias"}
    # a checkpoint without the gathered file (what a full-LLM run saves before its last step) still loads
    gathered = load_weights(ckpt)
    (ckpt / WEIGHTS).unlink()
    rebuilt = load_weights(ckpt)
    assert all(torch.equal(rebuilt[k], gathered[k].float()) for k in gathered)
    # resume from the step-6 DCP checkpoint as if everything after it was lost
    root = run / "checkpoints"
    for later in [p for p in root.glob("step-*") if int(p.name.split("-")[1]) > 6]:
        shutil.rmtree(later)
    (root / "latest").write_text("step-00000006")
    _run(_torchrun("--resume", str(run)), tmp_path / "fsdp-resume.log")
    assert losses(run) == full
    # frozen weights sharded like trainable ones (for models that do not fit one GPU): the same training
    cfg_file, run = _config(tmp_path, shapes_data, "fsdp-shard", "engine.name=fsdp", "engine.frozen=shard",
                            "engine.async_stager=dcp")
    _run(_torchrun("--config", str(cfg_file)), tmp_path / "fsdp-shard.log")
    assert losses(run) == pytest.approx(reference, **PARITY)
    assert "checkpoint buffers:" not in (run / "train.log").read_text()


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_train_and_resume(tmp_path, shapes_data, reference):
    """`torchrun --nnodes=2 --rdzv_backend=c10d` as two launchers on this machine (one process each): the same
    losses as one process with the same global batch, and a resume under the same two launchers continues."""
    cfg_file, run = _config(tmp_path, shapes_data, "nodes")
    port = _port()

    def launch(*args: str) -> list[subprocess.Popen]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=nodes-{port}",
               "-m", "minigpt4qwen", "train", *args]
        procs = [subprocess.Popen(cmd, stdout=open(tmp_path / f"node{i}.log", "w"), stderr=subprocess.STDOUT,
                                  env=ENV) for i in range(2)]
        for i, proc in enumerate(procs):
            assert proc.wait(timeout=400) == 0, (tmp_path / f"node{i}.log").read_text()[-3000:]
        return procs

    launch("--config", str(cfg_file))
    full = losses(run)
    assert full == pytest.approx(reference, **PARITY)
    root = run / "checkpoints"  # lose everything after step 6, then resume under two "nodes" again
    for later in [p for p in root.glob("step-*") if int(p.name.split("-")[1]) > 6]:
        shutil.rmtree(later)
    (root / "latest").write_text("step-00000006")
    launch("--resume", str(run))
    assert losses(run) == full


def test_frozen_parts_are_hidden_from_zero_but_still_run(tmp_path, shapes_data):
    from minigpt4qwen.models.minigpt4qwen import build_model
    from minigpt4qwen.train.engines import hide_frozen_parts, replicate_frozen

    cfg = tiny_config(tmp_path, shapes_data)
    assert replicate_frozen(cfg, torch.nn.Linear(2, 2), torch.device("cpu"))  # auto: always on the CPU
    cfg.engine.frozen = "shard"
    assert not replicate_frozen(cfg, torch.nn.Linear(2, 2), torch.device("cpu"))
    model = build_model(cfg.model).model.eval()
    ids = torch.randint(0, 100, (2, 20))
    ids[:, 2:6] = model.image_token_id
    labels = ids.clone()
    feats = torch.randn(2, 4, model.qformer.config.hidden_size)
    with torch.no_grad():
        before = model(ids, None, labels, features=feats)[0]
    hidden = hide_frozen_parts(model)
    assert set(hidden) == {"vision_model", "qformer", "llm", "query_tokens"}
    assert {n for n, _ in model.named_parameters()} == {"llm_proj.weight", "llm_proj.bias"}
    with torch.no_grad():
        assert torch.equal(model(ids, None, labels, features=feats)[0], before)


# --------------------------------------------------------------------------------------------- in-process checks


def test_lora_stage2_saves_loads_and_merges(tmp_path, shapes_data):
    from minigpt4qwen.models.minigpt4qwen import build_model

    cfg = tiny_config(tmp_path, shapes_data, "model.trainable.llm=lora", "train.max_steps=2", "train.llm_lr=5e-4")
    run = train(cfg)
    weights = load_weights(latest_checkpoint(run))
    lora = [k for k in weights if "lora_" in k]
    assert lora and {"llm_proj.weight", "llm_proj.bias"} <= set(weights)
    model = build_model(load_config(run / "config.yaml").model).model.eval()  # no LoRA dropout
    model.load_partial(weights, "trainable.safetensors")
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        before = model.llm(input_ids=ids).logits
        merged = merge_lora(model)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged.llm(input_ids=ids).logits, before, atol=1e-4)


def test_llm_lr_gets_its_own_param_groups(tmp_path, shapes_data):
    from minigpt4qwen.models.minigpt4qwen import build_model

    cfg = tiny_config(tmp_path, shapes_data, "model.trainable.llm=full")
    model = build_model(cfg.model).model
    groups = param_groups(model, 0.05, llm_lr=2e-5)
    assert [g.get("lr") for g in groups] == [None, None, 2e-5, 2e-5]
    llm_ids = {id(p) for p in model.llm.parameters()}
    assert all(id(p) in llm_ids for g in groups[2:] for p in g["params"])
    assert not any(id(p) in llm_ids for g in groups[:2] for p in g["params"])


def test_deepspeed_config_is_filled_from_train_settings(tmp_path, shapes_data):
    cfg: Config = tiny_config(tmp_path, shapes_data, "engine.name=deepspeed", "engine.zero_stage=3",
                              "engine.offload_optimizer=true", "engine.offload_params=true", "train.max_grad_norm=0.5")
    conf = deepspeed_config(cfg, "bf16")
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["gradient_accumulation_steps"] == 2
    assert conf["gradient_clipping"] == 0.5 and conf["bf16"] == {"enabled": True}
    assert conf["zero_optimization"]["stage"] == 3
    assert conf["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    for stage in range(4):
        assert deepspeed_config(tiny_config(tmp_path, shapes_data, f"engine.zero_stage={stage}"), "fp32")[
            "zero_optimization"]["stage"] == stage
    hint = oom_hint(cfg)
    assert hint.startswith("CUDA out of memory; try") and "grad_checkpointing_llm=true" in hint


def test_cpu_buffers_like_keeps_the_structure_and_copies_nothing():
    """What `engine.async_stager=direct` stages into: every tensor a new CPU buffer of its shape and dtype, scalars
    and empty tensors as zeros, other values and the nesting as they are."""
    from minigpt4qwen.train.engines import cpu_buffers_like

    state = {"model": {"w": torch.ones(3, 4, dtype=torch.bfloat16)},
             "optim": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.ones(5)}},
                       "param_groups": [{"lr": 0.1, "params": [0]}]},
             "empty": torch.ones(0, 2)}
    out = cpu_buffers_like(state, pin=False)
    assert out["model"]["w"].shape == (3, 4) and out["model"]["w"].dtype == torch.bfloat16
    assert out["model"]["w"].data_ptr() != state["model"]["w"].data_ptr()
    assert out["optim"]["state"][0]["step"].item() == 0.0 and out["optim"]["state"][0]["exp_avg"].shape == (5,)
    assert out["optim"]["param_groups"] == [{"lr": 0.1, "params": [0]}] and out["empty"].shape == (0, 2)


def test_optimizer_impl_picks_adamw_kernels_and_steps_alike(tmp_path, shapes_data):
    """train.optimizer_impl: foreach by default, fused on request (not under DeepSpeed); both make the same update.
    engine.fsdp_reduce_dtype sets FSDP2's reduce dtype."""
    from minigpt4qwen.models.minigpt4qwen import build_model
    from minigpt4qwen.train.engines import fsdp_mp_policy, make_optimizer

    cfg = tiny_config(tmp_path, shapes_data)
    model = build_model(cfg.model).model
    default, _ = make_optimizer(model, 10, cfg.train)
    assert not default.defaults["fused"]
    fused_cfg = tiny_config(tmp_path, shapes_data, "train.optimizer_impl=fused")
    fused, _ = make_optimizer(model, 10, fused_cfg.train)
    assert fused.defaults["fused"] is True
    assert not make_optimizer(model, 10, fused_cfg.train, fused_ok=False)[0].defaults["fused"]
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    after = []
    for opt in (default, fused):
        for g in opt.param_groups:
            g["lr"] = 1e-3  # the schedule starts at 0 during warmup
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
                p.grad = torch.full_like(p, 0.01)
        opt.step()
        after.append([p.detach().clone() for p in params])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*after))
    assert not all(torch.equal(a, s) for a, s in zip(after[0], start))
    with pytest.raises(ConfigError, match="optimizer_impl"):
        tiny_config(tmp_path, shapes_data, "train.optimizer_impl=adam8bit")
    assert fsdp_mp_policy("bf16").reduce_dtype == torch.float32
    assert fsdp_mp_policy("bf16", "bf16").reduce_dtype == torch.bfloat16
    assert fsdp_mp_policy("bf16", "bf16").param_dtype == torch.bfloat16 and fsdp_mp_policy("fp32").param_dtype is None
    with pytest.raises(ConfigError, match="fsdp_reduce_dtype"):
        tiny_config(tmp_path, shapes_data, "engine.fsdp_reduce_dtype=fp16")


def test_zero3_keeps_torch_linear_unless_asked(tmp_path, shapes_data):
    """DeepSpeed's memory_efficient_linear (its default) swaps torch.nn.functional.linear process-wide; under
    compiled layers on an H200 ZeRO-3 then did not learn. Off in every generated config; asked for together with
    train.compile it is refused with the fix."""
    for stage in range(4):
        conf = deepspeed_config(tiny_config(tmp_path, shapes_data, f"engine.zero_stage={stage}"), "bf16")
        assert conf["zero_optimization"]["memory_efficient_linear"] is False
    own = tmp_path / "z3.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 3, "memory_efficient_linear": True}}))
    cfg = tiny_config(tmp_path, shapes_data, "engine.name=deepspeed", "engine.zero_stage=3",
                      f"engine.deepspeed_config={own}")
    assert deepspeed_config(cfg, "bf16")["zero_optimization"]["memory_efficient_linear"] is True  # no compile: kept
    compiled = tiny_config(tmp_path, shapes_data, "engine.name=deepspeed", "engine.zero_stage=3",
                           f"engine.deepspeed_config={own}", "train.compile=true")
    with pytest.raises(ConfigError, match="memory_efficient_linear.*z3.json|z3.json.*memory_efficient_linear"):
        deepspeed_config(compiled, "bf16")


def test_prefaulted_stager_copies_into_the_buffers_it_made_before_the_first_save():
    """engine.async_stager=prefault: the buffers exist (and are being touched) before any save; every save copies into
    those same buffers, after the touching thread has ended, and the staged copy equals the state."""
    from minigpt4qwen.train.engines import prefaulted_stager

    state = {"model": {"w": torch.randn(300, 700), "b": torch.randn(3).to(torch.bfloat16)},
             "optim": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(300, 700)}},
                       "param_groups": [{"lr": 0.5, "params": [0]}]}}
    stager = prefaulted_stager(state)
    made = stager.buffers["model"]["w"]
    assert made.data_ptr() != state["model"]["w"].data_ptr()
    for _ in range(2):
        state["model"]["w"].add_(1.0)
        staged = stager.stage(state)
        assert stager.ready is None  # the page-touching thread was waited for
        assert staged["model"]["w"].data_ptr() == made.data_ptr()  # the same memory at every save
        assert torch.equal(staged["model"]["w"], state["model"]["w"])
        assert torch.equal(staged["optim"]["state"][0]["exp_avg"], state["optim"]["state"][0]["exp_avg"])
        assert staged["model"]["b"].dtype == torch.bfloat16 and torch.equal(staged["model"]["b"], state["model"]["b"])
        assert staged["optim"]["state"][0]["step"].item() == 3.0
        assert staged["optim"]["param_groups"][0]["lr"] == 0.5
