"""Training workflow: checkpoints, exact resume after SIGKILL, bad data policies, and train -> chat end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from minigpt4qwen.config import ConfigError, save_config
from minigpt4qwen.data.images import ImageError
from minigpt4qwen.models.minigpt4qwen import CheckpointMismatchError, build_model
from minigpt4qwen.runs import latest_checkpoint, load_weights
from minigpt4qwen.train.loop import lr_at, param_groups, train


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]


def test_run_directory_contents_and_checkpoint_round_trip(tiny_run):
    for name in ("config.yaml", "log.jsonl", "loss.png", "train.log", "tokenizer"):
        assert (tiny_run / name).exists(), name
    assert list((tiny_run / "tb").glob("events.out.tfevents.*"))
    ckpt = latest_checkpoint(tiny_run)
    weights = load_weights(ckpt)
    assert set(weights) == {"llm_proj.weight", "llm_proj.bias"}  # only what trains is saved
    from minigpt4qwen.config import load_config

    cfg = load_config(tiny_run / "config.yaml")
    fresh = build_model(cfg.model).model
    assert not torch.equal(fresh.llm_proj.weight, weights["llm_proj.weight"])
    fresh.load_partial(weights, str(ckpt))
    assert torch.equal(fresh.llm_proj.weight, weights["llm_proj.weight"])
    bad = {"llm_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointMismatchError, match="llm_proj.weight has shape \\[3, 3\\]"):
        fresh.load_partial(bad, "x.safetensors")
    with pytest.raises(CheckpointMismatchError, match="not in the model"):
        fresh.load_partial({"nope.weight": torch.zeros(1)}, "x.safetensors")


def test_schedule_and_param_groups():
    from minigpt4qwen.config import TrainConfig

    tc = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, warmup_start_lr=0.0)
    assert lr_at(0, 100, tc) == 0.0 and abs(lr_at(5, 100, tc) - 5e-4) < 1e-12
    assert abs(lr_at(10, 100, tc) - 1e-3) < 1e-12 and abs(lr_at(100, 100, tc) - 1e-5) < 1e-12
    assert lr_at(55, 100, tc) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    decay, no_decay = param_groups(lin, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 3])] and len(no_decay["params"]) == 3


def test_grad_accumulation_logs_true_mean_loss(tmp_path, shapes_data):
    """batch 8 x accum 1 and batch 4 x accum 2 see the same samples per step: same logged loss and same update."""
    a = train(tiny_config(tmp_path / "a", shapes_data, "train.batch_size=8", "train.grad_accum=1",
                          "train.max_steps=3"))
    b = train(tiny_config(tmp_path / "b", shapes_data, "train.batch_size=4", "train.grad_accum=2",
                          "train.max_steps=3"))
    la, lb = losses(a), losses(b)
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    wa, wb = load_weights(latest_checkpoint(a)), load_weights(latest_checkpoint(b))
    assert torch.allclose(wa["llm_proj.weight"], wb["llm_proj.weight"], atol=1e-5)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "minigpt4qwen", *args]


# LoRA dropout draws from the global RNG and crops/flips from per-sample generators: a resume must restore the
# first and not disturb it (a DataLoader iterator that draws its base seed from it shifted every later mask)
RANDOM_PARTS = ["model.trainable.llm=lora", "model.lora.dropout=0.1", "data.random_resized_crop=true",
                "data.hflip=true"]


def test_resume_after_sigkill_continues_the_same_loss_sequence(tmp_path, shapes_data):
    steps = 40
    extra = [f"train.max_steps={steps}", "train.save_every_steps=3", "train.batch_size=2", "train.grad_accum=1",
             "train.keep_last=1", *RANDOM_PARTS]
    full = train(tiny_config(tmp_path / "full", shapes_data, *extra))
    reference = losses(full)
    assert len(reference) == steps

    cfg = tiny_config(tmp_path / "killed", shapes_data, *extra)
    cfg_file = tmp_path / "killed.yaml"
    save_config(cfg, cfg_file)
    run = Path(cfg.train.output_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(_cli("train", "--config", str(cfg_file)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = run / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 7:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = len(losses(run))
    assert done_before < steps
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) <= done_before
    subprocess.run(_cli("train", "--resume", str(run)), check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    assert losses(run) == reference  # bit-identical continuation


def test_bad_image_error_names_file_and_keeps_checkpoint(tmp_path, shapes_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_data, data)
    rows = json.loads((data / "train_seed.json").read_text())
    (data / rows[5]["image"]).write_bytes(b"garbage")  # corrupt, found only when loaded
    cfg = tiny_config(tmp_path, data, "train.max_steps=30", "train.save_every_steps=1", "train.batch_size=2",
                      "train.grad_accum=1")
    with pytest.raises(ImageError, match=r"train_seed.json row 5: image .* cannot be decoded"):
        train(cfg)
    assert latest_checkpoint(cfg.train.output_dir) is not None  # saved work survives the crash
    skip = tiny_config(tmp_path / "skip", data, "train.max_steps=30", "train.batch_size=2", "train.grad_accum=1",
                       "data.on_bad_sample=skip")
    run = train(skip)
    assert len(losses(run)) == 30
    (data / rows[7]["image"]).unlink()
    with pytest.raises(ImageError, match="1 image file\\(s\\) missing"):
        train(tiny_config(tmp_path / "missing", data, "train.max_steps=1"))


def test_train_then_chat_query_end_to_end(tiny_run, shapes_data):
    from minigpt4qwen.data.conversation import IMAGE_PROMPT, Turn
    from minigpt4qwen.serve.generate import Assistant, GenerationSettings

    image = shapes_data / "images" / "heldout_00000.png"
    query = "What color is the shape?"
    out = subprocess.run(_cli("chat", "--checkpoint", str(tiny_run), "--image", str(image), "--query", query,
                              "--max-new-tokens", "6"), capture_output=True, text=True, check=True)
    assistant = Assistant.from_run(tiny_run, device="cpu")
    ref = assistant.generate([[Turn("user", f"{IMAGE_PROMPT} {query}")]], [[image]], GenerationSettings(6))[0]
    assert out.stdout.strip() == ref
    # the image changes the answer's input: a different image gives different prompt embeddings
    e1, _ = assistant.prepare([[Turn("user", f"{IMAGE_PROMPT} {query}")]], [[image]])
    e2, _ = assistant.prepare([[Turn("user", f"{IMAGE_PROMPT} {query}")]], [[Image.new("RGB", (32, 32))]])
    assert not torch.allclose(e1, e2)


def test_chat_cli_reports_bad_image_in_one_line(tiny_run, tmp_path):
    out = subprocess.run(_cli("chat", "--checkpoint", str(tiny_run), "--image", str(tmp_path / "missing.png"),
                              "--query", "hi"), capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: image ") and "missing.png" in out.stderr


def test_cached_features_give_the_same_losses(tmp_path, shapes_data):
    """Training from cached Q-Former features is the same computation as running the frozen towers every step."""
    from minigpt4qwen.config import ConfigError

    plain = train(tiny_config(tmp_path / "plain", shapes_data, "train.max_steps=3"))
    cached = train(tiny_config(tmp_path / "cached", shapes_data, "train.max_steps=3", "data.cache_features=true"))
    assert losses(cached) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)
    with pytest.raises(ConfigError, match="cache_features needs"):
        train(tiny_config(tmp_path / "bad", shapes_data, "train.max_steps=1", "data.cache_features=true",
                          "data.hflip=true"))


def test_fast_decoder_path_gives_the_same_answers(tiny_run, shapes_data):
    """Greedy batches through FastDecoder (the CUDA default) equal HF generate's answers."""
    from minigpt4qwen.data.conversation import IMAGE_PROMPT, Turn
    from minigpt4qwen.serve.generate import Assistant, GenerationSettings

    a = Assistant.from_run(tiny_run, device="cpu")
    convs = [[Turn("user", f"{IMAGE_PROMPT} {q}")] for q in ("What color is it?", "How many shapes are there now?")]
    imgs = [[shapes_data / "images/heldout_00000.png"], [shapes_data / "images/heldout_00001.png"]]
    s = GenerationSettings(max_new_tokens=6)
    a.fast_decode = False
    ref = a.model.llm.generate(**a._generate_kwargs(convs, imgs, s))
    a.fast_decode = True
    fast = a._fast_decode(a._generate_kwargs(convs, imgs, s), 6)
    assert torch.equal(fast[:, : ref.shape[1]], ref)
    assert a.generate(convs, imgs, s) == [t.strip() for t in a.tokenizer.batch_decode(ref, skip_special_tokens=True)]


def test_compiled_llm_layers_train_the_same(tmp_path, shapes_data):
    """train.compile traces every decoder layer with torch.compile (aot_eager: the same graphs as inductor gets,
    without generating kernels on a CI CPU); the losses equal the eager run's and the layers share compiled code."""
    from torch._dynamo.utils import counters

    plain = train(tiny_config(tmp_path / "plain", shapes_data, "train.max_steps=3"))
    counters.clear()
    compiled = train(tiny_config(tmp_path / "compiled", shapes_data, "train.max_steps=3", "train.compile=true",
                                 "train.compile_backend=aot_eager"))
    assert losses(compiled) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)
    frames = counters["frames"]["ok"]
    assert 1 <= frames <= 4, f"{frames} compiled frames: the layers should share one compiled graph"


def test_compile_decode_flag_reaches_the_decoder(tiny_run, shapes_data, monkeypatch):
    """`--compile-decode` on chat/webui/serve becomes Assistant.compile_decoder, which FastDecoder is built with."""
    from minigpt4qwen.__main__ import build_parser
    from minigpt4qwen.data.conversation import IMAGE_PROMPT, Turn
    from minigpt4qwen.serve import fastdecode
    from minigpt4qwen.serve.generate import Assistant, GenerationSettings

    for cmd in ("chat", "webui", "serve"):
        assert build_parser().parse_args([cmd, "--checkpoint", str(tiny_run), "--compile-decode"]).compile_decode
        assert not build_parser().parse_args([cmd, "--checkpoint", str(tiny_run)]).compile_decode
    seen = []

    class Recording(fastdecode.FastDecoder):
        def __init__(self, *args, compile=False, **kw):
            seen.append((compile, kw.get("fuse")))
            super().__init__(*args, **kw)  # eager here: compiling on a CI CPU would take minutes

    monkeypatch.setattr(fastdecode, "FastDecoder", Recording)
    a = Assistant.from_run(tiny_run, device="cpu", compile_decoder=True)
    a.fast_decode = True
    conv = [[Turn("user", f"{IMAGE_PROMPT} What color is it?")]]
    a.generate(conv, [[shapes_data / "images/heldout_00000.png"]], GenerationSettings(max_new_tokens=3))
    assert seen == [(True, True)]


def test_resume_refuses_another_schedule_or_batch(tmp_path, shapes_data):
    """A resume with another step count or global batch would continue on another LR curve from another data position:
    it stops with the key to fix instead."""
    from minigpt4qwen.config import ConfigError

    run = train(tiny_config(tmp_path, shapes_data, "train.max_steps=2", "train.save_every_steps=1"))
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="total_steps=2, this run has 4"):
        train(resume=run, overrides=["train.max_steps=4"])
    with pytest.raises(ConfigError, match="global_batch=8, this run has 4"):
        train(resume=run, overrides=["train.grad_accum=1"])
    assert (run / "config.yaml").read_text() == saved  # a refused resume leaves the run as it was


def test_a_fresh_start_never_overwrites_a_run(tmp_path, shapes_data):
    cfg = tiny_config(tmp_path, shapes_data, "train.max_steps=2")
    run = train(cfg)
    before = (run / "log.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run .*--resume .*--overwrite"):
        train(tiny_config(tmp_path, shapes_data, "train.max_steps=3"))
    assert (run / "log.jsonl").read_text() == before and latest_checkpoint(run).name == "step-00000002"
    train(tiny_config(tmp_path, shapes_data, "train.max_steps=3"), overwrite=True)
    assert len(losses(run)) == 3 and latest_checkpoint(run).name == "step-00000003"


def test_full_disk_stops_before_writing_and_keeps_the_last_checkpoint(tmp_path, shapes_data, monkeypatch):
    import shutil as _shutil

    from minigpt4qwen.train import loop

    cfg = tiny_config(tmp_path, shapes_data, "train.max_steps=6", "train.save_every_steps=2")
    real = _shutil.disk_usage
    calls = {"n": 0}

    def usage(path):  # plenty of room for the first checkpoint, then almost none
        calls["n"] += 1
        total, used, free = real(path)
        return type(real(path))(total, used, free if calls["n"] == 1 else 1000)

    monkeypatch.setattr(loop.shutil, "disk_usage", usage)
    with pytest.raises(OSError, match=r"not enough disk space for checkpoint step 4 .*needs about .* GB"):
        train(cfg)
    run = Path(cfg.train.output_dir)
    assert latest_checkpoint(run).name == "step-00000002"
    assert not list((run / "checkpoints").glob(".step-*"))  # nothing half-written left behind


def test_save_schedule():
    from minigpt4qwen.config import TrainConfig
    from minigpt4qwen.train.loop import save_due

    every_epoch = [s for s in range(1, 13) if save_due(s, 12, 4, TrainConfig())]
    assert every_epoch == [4, 8, 12]
    assert [s for s in range(1, 13) if save_due(s, 12, 4, TrainConfig(save_every_epochs=2))] == [8, 12]
    assert [s for s in range(1, 13) if save_due(s, 12, 4, TrainConfig(save_every_epochs=0, save_every_steps=5))] \
        == [5, 10, 12]


def test_profile_steps_write_an_op_table_and_a_trace(tmp_path, shapes_data):
    """train.profile_steps=[2,2] records optimizer steps 2-3: the op table names the model's ops, the trace loads as
    Chrome trace JSON, and the run's losses are unchanged by profiling."""
    run = train(tiny_config(tmp_path / "p", shapes_data, "train.max_steps=4", "train.profile_steps=[2,2]"))
    ops = (run / "profile" / "ops.txt").read_text()
    assert "optimizer steps 2..3" in ops and "aten::mm" in ops
    trace = json.loads((run / "profile" / "trace.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#1", "ProfilerStep#2"}, steps  # the 2nd and 3rd optimizer steps (#0 = the 1st)
    plain = train(tiny_config(tmp_path / "q", shapes_data, "train.max_steps=4"))
    assert losses(run) == pytest.approx(losses(plain), rel=1e-6)
    with pytest.raises(ConfigError, match="profile_steps"):
        tiny_config(tmp_path / "bad", shapes_data, "train.profile_steps=[0,2]")
    short = train(tiny_config(tmp_path / "s", shapes_data, "train.max_steps=2", "train.profile_steps=[2,5]"))
    assert (short / "profile" / "ops.txt").read_text().startswith("# optimizer steps 2..2,")  # what was recorded


def test_padding_to_a_multiple_keeps_the_losses(tmp_path, shapes_data):
    """data.pad_to_multiple_of only adds masked positions: batches are a multiple wide, the losses stay the same."""
    from minigpt4qwen.data.collate import collate

    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "pixel_values": None, "truncated": False}], 0,
                    multiple=8)
    assert batch["input_ids"].shape == (1, 8) and batch["attention_mask"].sum() == 3
    from minigpt4qwen.data.collate import AUTO_MULTIPLE, pad
    assert pad([[1] * 70], 0, multiple=AUTO_MULTIPLE)[0].shape == (1, 70)  # short rows (stage 1): as they come
    assert pad([[1] * 600], 0, multiple=AUTO_MULTIPLE)[0].shape == (1, 640)  # long rows: few distinct lengths
    plain = train(tiny_config(tmp_path / "plain", shapes_data, "train.max_steps=3", "data.pad_to_multiple_of=1"))
    padded = train(tiny_config(tmp_path / "pad", shapes_data, "train.max_steps=3", "data.pad_to_multiple_of=64"))
    assert losses(padded) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)


def test_max_memory_gib_caps_the_gpu_and_is_refused_on_cpu(monkeypatch, tmp_path, shapes_data):
    """train.max_memory_gib sets the per-process fraction of the GPU (what the 24 GB presets are checked with on a
    larger card); more than the card has, or a CPU run, is one clear error before the model loads."""
    import types

    from minigpt4qwen.config import ConfigError
    from minigpt4qwen.train import loop

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, str(d))))
    loop.cap_memory(torch.device("cuda:0"), 24)
    loop.cap_memory(torch.device("cuda:0"), 0)  # no cap: nothing set
    assert calls == [(24 / 80, "cuda:0")]
    with pytest.raises(ConfigError, match="max_memory_gib=96 is more than the 80.0 GiB of cuda:0"):
        loop.cap_memory(torch.device("cuda:0"), 96)
    built = []
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: built.append(1))
    with pytest.raises(ConfigError, match="caps GPU memory; this run is on cpu"):
        train(tiny_config(tmp_path / "run", shapes_data, "train.max_memory_gib=22"))
    assert not built
