"""`minigpt4qwen convert ...` and `info` on tiny files in the seed's exact formats.

The LAVIS and Qwen-1 fixtures are the ones test_convert_lavis.py / test_convert_qwen1.py check against EVA, BERT and
Qwen-1 math; here they go through the commands and the training / serving paths a user would take. A file that does
not fit must stop the command with one line (exit 2) and leave no output folder.

Run: python -m pytest tests/test_convert_cli.py
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_convert_lavis import (
    EVA_BLOCK_EPS,
    EVA_HEADS,
    EVA_MLP,
    EVA_WIDTH,
    IMAGE,
    LAVIS_LN_VISION_EPS,
    PATCH,
    QF_HEADS,
    USED_BLOCKS,
    hf_features,
    make_blip2_state,
    make_eva_state,
    reference_vision,
)
from test_convert_qwen1 import QWEN1_CONFIG, make_qwen1_state, write_qwen1_dir

from minigpt4qwen.convert_cli import VISION_SIDE, add_convert_args, add_info_args, export_run, meta_model
from minigpt4qwen.models.convert import CheckpointKeyError, load_blip2_vision_side, split_blip2_state
from minigpt4qwen.models.minigpt4qwen import CheckpointMismatchError, build_model

LAVIS_ARGS = ("--num-vision-layers", USED_BLOCKS, "--vision-heads", EVA_HEADS, "--qformer-heads", QF_HEADS)


def cli(*argv) -> int:
    """The convert/info subcommands through argparse, as __main__ registers them."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_convert_args(sub)
    add_info_args(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.fn(args)


@pytest.fixture(scope="module")
def lavis_files(tmp_path_factory) -> tuple[Path, Path, dict]:
    """eva_vit_g.pth (plain state dict) + blip2_pretrained_*.pth ({"model": ...}) and their direct conversion."""
    root = tmp_path_factory.mktemp("lavis")
    torch.save(make_eva_state(), root / "eva_vit_g.pth")
    torch.save({"model": make_blip2_state()}, root / "blip2_pretrained_flant5xxl.pth")
    state, _ = load_blip2_vision_side(root / "eva_vit_g.pth", root / "blip2_pretrained_flant5xxl.pth", USED_BLOCKS)
    return root / "eva_vit_g.pth", root / "blip2_pretrained_flant5xxl.pth", state


@pytest.fixture
def lavis_preset(monkeypatch) -> list[str]:
    """A vision preset with the LAVIS fixture's EVA shapes (its Q-Former already has the `tiny` preset's shapes)."""
    from minigpt4qwen.models.vision import VISION_PRESETS

    preset = {"hidden_size": EVA_WIDTH, "intermediate_size": EVA_MLP, "num_hidden_layers": USED_BLOCKS,
              "num_attention_heads": EVA_HEADS, "image_size": IMAGE, "patch_size": PATCH, "layer_norm_eps": 1e-6}
    monkeypatch.setitem(VISION_PRESETS, "lavis-test", preset | {"qkv_bias": True})
    return ["model.vision=lavis-test"]


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """The installed command's entry point (its error handling included): exit code, stdout, stderr."""
    from minigpt4qwen.__main__ import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def _vision_side(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if n.split(".")[0] in VISION_SIDE}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_convert_lavis_loads_in_transformers_and_here(lavis_files, lavis_preset, shapes_data, tmp_path, capsys):
    from transformers import Blip2Model, Blip2QFormerModel, Blip2VisionModel

    eva, blip2, direct = lavis_files
    out = tmp_path / "blip2-hf"
    assert cli("convert", "lavis", "--eva", eva, "--blip2", blip2, "--out", out, *LAVIS_ARGS) == 0
    printed = capsys.readouterr().out
    assert "ignored 13 eva tensors" in printed and "blocks.2." in printed  # BLIP-2 drops EVA's last block
    assert "blip2 tensors" in printed and "Qformer.bert.embeddings.word_embeddings.weight" in printed

    vision = Blip2VisionModel.from_pretrained(out, key_mapping={r"^vision_model\.": ""}).eval()
    qformer = Blip2QFormerModel.from_pretrained(out, key_mapping={r"^qformer\.": ""}).eval()
    # plain transformers has one eps for all vision norms; LAVIS's ln_vision needs its own (docs/original_files.md)
    assert vision.post_layernorm.eps == EVA_BLOCK_EPS
    vision.post_layernorm.eps = LAVIS_LN_VISION_EPS
    image = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        features = vision(pixel_values=image).last_hidden_state
        queries = qformer(query_embeds=direct["query_tokens"].expand(2, -1, -1),
                          encoder_hidden_states=features).last_hidden_state
    ref_features, ref_queries = hf_features(direct, image)
    assert torch.equal(features, ref_features) and torch.equal(queries, ref_queries)

    full, info = Blip2Model.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and info["missing_keys"]
    assert all(k.startswith(("language_model.", "language_projection.")) for k in info["missing_keys"])
    assert _equal({k: v for k, v in full.state_dict().items() if k in direct}, direct)

    cfg = tiny_config(tmp_path, shapes_data, *lavis_preset, f"model.vision_checkpoint={out}")
    ours = build_model(cfg.model).model
    assert _equal(_vision_side(ours), direct)
    # config.json keeps EVA's 1e-6; our builder gives ln_vision LAVIS's 1e-5 back, which float64 tells apart from 1e-6
    assert ours.vision_model.post_layernorm.eps == LAVIS_LN_VISION_EPS
    eva_state, blip2_state = (torch.load(f, weights_only=True) for f in (eva, blip2))
    double = {k: v.double() for k, v in eva_state.items()}, {k: v.double() for k, v in blip2_state["model"].items()}
    with torch.no_grad():
        ours_features = ours.vision_model.double()(pixel_values=image.double()).last_hidden_state
    assert (ours_features - reference_vision(*double, image.double())).abs().max().item() <= 1e-10


def test_lavis_run_trains_and_exports_trained_qformer_and_lora(lavis_files, lavis_preset, shapes_data, tmp_path,
                                                              monkeypatch):
    """A run on the LAVIS files starts from their weights; its export keeps the trained Q-Former and LoRA."""
    from minigpt4qwen.data.conversation import IMAGE_PROMPT, Turn
    from minigpt4qwen.serve.generate import Assistant
    from minigpt4qwen.runs import latest_checkpoint, load_weights
    from minigpt4qwen.train.loop import train

    eva, blip2, direct = lavis_files
    run = train(tiny_config(tmp_path, shapes_data, *lavis_preset, f"model.eva_checkpoint={eva}",
                            f"model.blip2_checkpoint={blip2}", "model.trainable.qformer=full",
                            "model.trainable.llm=lora", "train.max_steps=1", "train.warmup_steps=0"))
    trained = load_weights(latest_checkpoint(run))
    vision, _, queries = split_blip2_state(direct)
    assert not torch.equal(trained["query_tokens"], queries)  # the Q-Former trained one step

    def logits(run_dir: Path) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(3)  # the frozen tiny LLM is random: the same seed rebuilds the same base weights
        assistant = Assistant.from_run(run_dir, device="cpu")
        assert assistant.model.vision_model.post_layernorm.eps == LAVIS_LN_VISION_EPS  # the export's too
        turns = [Turn("user", f"{IMAGE_PROMPT} What color is the shape?")]
        embeds, mask = assistant.prepare([turns], [[shapes_data / "images" / "heldout_00000.png"]])
        with torch.no_grad():
            return assistant.model.llm(inputs_embeds=embeds, attention_mask=mask).logits, _vision_side(assistant.model)

    before, loaded = logits(run)
    assert _equal({k: v for k, v in loaded.items() if k.startswith("vision_model.")},
                  {f"vision_model.{k}": v for k, v in vision.items()})
    torch.manual_seed(3)
    out = export_run(run, tmp_path / "export")
    exported = load_weights(latest_checkpoint(out))
    lora = {k for k in trained if k.startswith("llm.")}
    assert lora and exported.keys() == lora | {"llm_proj.weight", "llm_proj.bias"}
    after, exported_vision = logits(out)
    assert torch.equal(after, before)
    assert _equal({k: v for k, v in exported_vision.items() if not k.startswith("vision_model.")},
                  {k: v for k, v in trained.items() if k.split(".")[0] in VISION_SIDE})


LAVIS_DAMAGE = [  # (file, key, new shape or None to delete it, the one line the command must print)
    ("eva", "blocks.1.mlp.fc2.weight", (EVA_WIDTH, EVA_MLP + 1),
     r"eva:blocks\.1\.mlp\.fc2\.weight \(ours: vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight\) has shape "
     r"\[48, 97\], expected \[48, 96\] .*re-download"),
    ("blip2", "Qformer.bert.encoder.layer.1.output_query.dense.weight", (32, 65),
     r"blip2:Qformer\.bert\.encoder\.layer\.1\.output_query\.dense\.weight \(ours: qformer\.encoder\.layer\.1\."
     r"output_query\.dense\.weight\) has shape \[32, 65\], expected \[32, 64\] .*re-download"),
    ("eva", "blocks.0.norm2.bias", None,
     r"needs 1 key\(s\) the checkpoint lacks, the first eva:blocks\.0\.norm2\.bias \(ours: vision_model\.encoder\."
     r"layers\.0\.layer_norm2\.bias\); they should come from eva_vit_g\.pth"),
    ("blip2", "ln_vision.bias", None,
     r"needs 1 key\(s\) the checkpoint lacks, the first blip2:ln_vision\.bias \(ours: vision_model\.post_layernorm\."
     r"bias\); they should come from the LAVIS BLIP-2 checkpoint"),
]


def _damaged_lavis_files(root: Path, file: str, key: str, shape: tuple | None) -> tuple[Path, Path]:
    eva, blip2 = make_eva_state(), make_blip2_state()
    state = eva if file == "eva" else blip2
    if shape is None:
        del state[key]
    else:
        state[key] = torch.zeros(shape)
    root.mkdir()
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": blip2}, root / "blip2_pretrained_flant5xxl.pth")
    return root / "eva_vit_g.pth", root / "blip2_pretrained_flant5xxl.pth"


@pytest.mark.parametrize(("file", "key", "shape", "message"), LAVIS_DAMAGE,
                         ids=["eva-shape", "blip2-shape", "eva-missing", "blip2-missing"])
def test_convert_lavis_refuses_a_wrong_file_in_one_line(tmp_path, capsys, file, key, shape, message):
    eva, blip2 = _damaged_lavis_files(tmp_path / "lavis", file, key, shape)
    out = tmp_path / "blip2-hf"
    code, stdout, stderr = run_main(capsys, "convert", "lavis", "--eva", eva, "--blip2", blip2, "--out", out,
                                    *LAVIS_ARGS)
    assert code == 2 and not out.exists() and stdout == ""
    assert len(stderr.splitlines()) == 1 and re.fullmatch(rf"error: .*{message}.*\n", stderr)


def test_training_load_names_the_lavis_key(tmp_path, shapes_data, lavis_preset):
    """build_model's LAVIS path (model.eva_checkpoint + blip2_checkpoint) checks before it loads anything."""
    eva, blip2 = _damaged_lavis_files(tmp_path / "lavis", *LAVIS_DAMAGE[0][:3])
    cfg = tiny_config(tmp_path, shapes_data, *lavis_preset, f"model.eva_checkpoint={eva}",
                      f"model.blip2_checkpoint={blip2}")
    # against the model the config builds: the same key, shapes and a pointer at the config key
    named = LAVIS_DAMAGE[0][3].split(" .*")[0]
    with pytest.raises(CheckpointKeyError, match=rf"^[^\n]*{named} .*check model\.vision[^\n]*$"):
        build_model(cfg.model)


@pytest.mark.filterwarnings("ignore:Qwen-1")
@pytest.mark.parametrize(("key", "shape", "message"), [
    ("transformer.h.1.mlp.c_proj.weight", (32, 65),
     r"qwen1:transformer\.h\.1\.mlp\.c_proj\.weight \(ours: model\.layers\.1\.mlp\.down_proj\.weight\) has shape "
     r"\[32, 65\], expected \[32, 64\] .*use the config\.json that came with these shards"),
    ("transformer.h.0.attn.c_attn.weight", (97, 32),
     r"qwen1:transformer\.h\.0\.attn\.c_attn\.weight \(ours: model\.layers\.0\.self_attn\.q_proj/k_proj/v_proj\."
     r"weight\) has shape \[97, 32\], expected \[96, 32\]"),
    ("transformer.wte.weight", None,
     r"needs 1 key\(s\) the checkpoint lacks, the first qwen1:transformer\.wte\.weight \(ours: model\.embed_tokens\."
     r"weight\)"),
], ids=["mlp-shape", "c_attn-shape", "missing"])
def test_convert_qwen1_refuses_a_wrong_file_in_one_line(tmp_path, capsys, key, shape, message):
    state = make_qwen1_state(QWEN1_CONFIG)
    if shape is None:
        del state[key]
    else:
        state[key] = torch.zeros(shape)
    src = write_qwen1_dir(tmp_path / "qwen1", state, safetensors=True)
    out = tmp_path / "qwen2"
    code, stdout, stderr = run_main(capsys, "convert", "qwen1", "--src", src, "--out", out)
    assert code == 2 and not out.exists() and stdout == ""
    assert len(stderr.splitlines()) == 1 and re.fullmatch(rf"error: .*{message}.*\n", stderr)


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_export_answers_like_the_run_after_it_is_gone(tiny_run, shapes_data, tmp_path, monkeypatch, capsys):
    from minigpt4qwen.__main__ import main

    run = shutil.copytree(tiny_run, tmp_path / "run")
    image = (shapes_data / "images" / "heldout_00000.png").resolve()
    # the random tiny LLM repeats "\n" (stripped: "") unless penalised; with the penalty its text depends on its weights
    query = ["--image", image, "--query", "What color is the shape?", "--max-new-tokens", "8", "--repetition-penalty", "3"]

    def chat(checkpoint: Path) -> str:
        torch.manual_seed(2)  # the tiny run's frozen LLM is random: the same seed rebuilds the same weights
        capsys.readouterr()
        assert main([str(a) for a in ("chat", "--checkpoint", checkpoint, *query)]) == 0
        return capsys.readouterr().out.strip()

    answer = chat(run)
    torch.manual_seed(2)
    export_run(run, tmp_path / "export")
    shutil.rmtree(run)
    moved = shutil.move(tmp_path / "export", tmp_path / "elsewhere")
    config = (Path(moved) / "config.yaml").read_text()
    assert "llm: llm" in config and "vision_checkpoint: vision" in config and str(tmp_path) not in config
    assert answer and chat(Path(moved)) == answer


def test_to_seed_and_seed_projector_round_trip(tiny_run, shapes_data, tmp_path, capsys):
    from safetensors.torch import load_file

    from minigpt4qwen.runs import latest_checkpoint, load_weights

    ours = {k: v for k, v in load_weights(latest_checkpoint(tiny_run)).items() if k.startswith("llm_proj.")}
    assert cli("convert", "to-seed", "--checkpoint", tiny_run, "--out", tmp_path / "model.pth") == 0
    seed = torch.load(tmp_path / "model.pth", weights_only=True)
    assert list(seed) == ["model"] and _equal(seed["model"], ours)

    # LAVIS's checkpoint_N.pth: trainable parameters + every buffer under "model", and the optimizer, config, epoch
    lavis = {"model": ours | {"Qformer.bert.embeddings.position_ids": torch.arange(4)[None]},
             "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "config": {"run": {"amp": True}}, "epoch": 9}
    variants = {"lavis.pth": lavis, "deepspeed.pth": {"module": ours},
                "plain.pth": {f"module.{k}": v for k, v in ours.items()}}
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        assert cli("convert", "seed-projector", "--src", tmp_path / name, "--out", tmp_path / f"{name}.st") == 0
        assert _equal(load_file(tmp_path / f"{name}.st"), ours)
    assert cli("convert", "seed-projector", "--src", tmp_path / "model.pth", "--out", tmp_path / "back.st") == 0
    assert _equal(load_file(tmp_path / "back.st"), ours)

    cfg = tiny_config(tmp_path, shapes_data, f"model.projector_checkpoint={tmp_path / 'model.pth'}")
    started = build_model(cfg.model).model  # what `train` builds before its first step
    assert _equal({k: v for k, v in started.named_parameters() if k.startswith("llm_proj.")}, ours)

    wrong = {"model": {"llm_proj.weight": torch.zeros(64, 48), "llm_proj.bias": torch.zeros(64)}}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        cli("convert", "seed-projector", "--src", tmp_path / "wrong.pth", "--out", tmp_path / "w.st",
            "model.vision=tiny", "model.qformer=tiny", "model.llm=random:tiny-qwen2")
    assert "llm_proj.weight has shape [64, 48]" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointMismatchError, match=r"^[^\n]*llm_proj\.weight has shape \[64, 48\][^\n]*$"):
        build_model(tiny_config(tmp_path, shapes_data, f"model.projector_checkpoint={tmp_path / 'wrong.pth'}").model)


@pytest.mark.filterwarnings("ignore:Qwen-1")
def test_convert_qwen1_and_info_from_directories(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src = write_qwen1_dir(tmp_path / "qwen1", make_qwen1_state(QWEN1_CONFIG), safetensors=True)
    out = tmp_path / "qwen2"
    assert cli("convert", "qwen1", "--src", src, "--out", out, "--max-shard-size", "40KB") == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    real = sum(p.numel() for p in model.parameters())
    for llm in (src, out):  # info reads config.json only: an original Qwen-1 dir and the converted one agree
        assert meta_model(tiny_config(tmp_path, tmp_path, f"model.llm={llm}", "model.tokenizer=null").model)[1][
            "llm"][1] == real


def test_info_counts_qwen7b_on_meta(capsys):
    root = Path(__file__).resolve().parents[1]
    argv = ("--config", root / "configs" / "minigpt4qwen-7b.yaml", "model.llm=random:qwen-7b")
    assert cli("info", *argv) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    counts = {part: int(rows[part][1].replace(",", "")) for part in ("vision", "qformer", "projector", "llm")}
    # ViT-g 39 blocks + ln_vision; Q-Former query path + 32 queries (0.105B, the "0.11B"); Qwen-7B as native Qwen2
    for part, expected in {"vision": 0.99e9, "qformer": 0.105e9, "llm": 7.72e9}.items():
        assert abs(counts[part] / expected - 1) < 0.02, (part, counts[part])
    assert counts["projector"] == 768 * 4096 + 4096
    from minigpt4qwen.config import load_config

    model, _ = meta_model(load_config(*argv[1:2], argv[2:]).model)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated: 8.8B parameters would be 35 GB
