"""LAVIS BLIP-2 -> transformers Blip2: tiny checkpoints in the exact LAVIS key layout, checked against EVA/BERT math.

The reference forward below is written from the EVA ViT and BERT block equations, not from transformers' modules, so
a wrong rename, transposition, bias placement or norm eps shows up as a feature mismatch. Files of the wrong size or
with a damaged tensor must fail in one line that names the LAVIS key, ours and both shapes.

Run: python -m pytest tests/test_convert_lavis.py
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt4qwen.models.convert import (
    CheckpointKeyError,
    lavis_to_hf_blip2,
    load_blip2_vision_side,
    load_hf_blip2_dir,
    split_blip2_state,
)
from minigpt4qwen.models.vision import VISION_PRESETS, build_vision

EVA_WIDTH, EVA_HEADS, EVA_MLP, EVA_BLOCKS, USED_BLOCKS = 48, 4, 96, 3, 2
PATCH, IMAGE = 8, 32
QF_WIDTH, QF_HEADS, QF_MLP, QF_LAYERS, CROSS_FREQ, QUERIES = 32, 4, 64, 2, 2, 4
# LAVIS's ln_vision is a plain LayerNorm (eps 1e-5) while EVA's block norms use 1e-6. Blip2VisionConfig has one eps,
# so a plain Blip2VisionModel would run ln_vision with 1e-6: on these features that moves the output by ~1e-5, which
# the float64 comparison below (error ~1e-15) tells apart from a match.
LAVIS_LN_VISION_EPS, EVA_BLOCK_EPS = 1e-5, 1e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g: torch.Generator, *shape: int, scale: float = 0.2, offset: float = 0.0) -> Tensor:
    return torch.randn(*shape, generator=g) * scale + offset


def _linear(g: torch.Generator, state: dict, name: str, out_dim: int, in_dim: int) -> None:
    state[f"{name}.weight"] = _rand(g, out_dim, in_dim, scale=1 / math.sqrt(in_dim))
    state[f"{name}.bias"] = _rand(g, out_dim, scale=0.1)


def _norm(g: torch.Generator, state: dict, name: str, dim: int) -> None:
    # Non-trivial weights so a swapped weight/bias or a missed norm cannot pass.
    state[f"{name}.weight"] = _rand(g, dim, scale=0.1, offset=1.0)
    state[f"{name}.bias"] = _rand(g, dim, scale=0.1)


def make_eva_state(seed: int = 0) -> dict[str, Tensor]:
    """eva_vit_g.pth layout (keys and shapes), tiny sizes, random values."""
    g, s = _gen(seed), {}
    s["cls_token"] = _rand(g, 1, 1, EVA_WIDTH)
    s["pos_embed"] = _rand(g, 1, (IMAGE // PATCH) ** 2 + 1, EVA_WIDTH)
    s["patch_embed.proj.weight"] = _rand(g, EVA_WIDTH, 3, PATCH, PATCH, scale=0.05)
    s["patch_embed.proj.bias"] = _rand(g, EVA_WIDTH, scale=0.1)
    for i in range(EVA_BLOCKS):
        b = f"blocks.{i}."
        _norm(g, s, b + "norm1", EVA_WIDTH)
        s[b + "attn.qkv.weight"] = _rand(g, 3 * EVA_WIDTH, EVA_WIDTH, scale=1 / math.sqrt(EVA_WIDTH))
        s[b + "attn.q_bias"] = _rand(g, EVA_WIDTH, scale=0.1)
        s[b + "attn.v_bias"] = _rand(g, EVA_WIDTH, scale=0.1)
        _linear(g, s, b + "attn.proj", EVA_WIDTH, EVA_WIDTH)
        _norm(g, s, b + "norm2", EVA_WIDTH)
        _linear(g, s, b + "mlp.fc1", EVA_MLP, EVA_WIDTH)
        _linear(g, s, b + "mlp.fc2", EVA_WIDTH, EVA_MLP)
    return s


def make_blip2_state(seed: int = 1) -> dict[str, Tensor]:
    """The "model" dict of a LAVIS blip2_pretrained_flant5xxl.pth: vision glue, Q-Former (query and text paths),
    ITC/ITM heads and T5-side keys, tiny sizes, random values."""
    g, s = _gen(seed), {}
    _norm(g, s, "ln_vision", EVA_WIDTH)
    s["query_tokens"] = _rand(g, 1, QUERIES, QF_WIDTH, scale=0.5)
    e = "Qformer.bert.embeddings."
    _norm(g, s, e + "LayerNorm", QF_WIDTH)
    s[e + "word_embeddings.weight"] = _rand(g, 30, QF_WIDTH)
    s[e + "position_embeddings.weight"] = _rand(g, 16, QF_WIDTH)
    s[e + "position_ids"] = torch.arange(16).unsqueeze(0)
    for i in range(QF_LAYERS):
        p = f"Qformer.bert.encoder.layer.{i}."
        cross = [("crossattention", EVA_WIDTH)] if i % CROSS_FREQ == 0 else []
        for kind, kv_dim in [("attention", QF_WIDTH)] + cross:
            _linear(g, s, f"{p}{kind}.self.query", QF_WIDTH, QF_WIDTH)
            _linear(g, s, f"{p}{kind}.self.key", QF_WIDTH, kv_dim)
            _linear(g, s, f"{p}{kind}.self.value", QF_WIDTH, kv_dim)
            _linear(g, s, f"{p}{kind}.output.dense", QF_WIDTH, QF_WIDTH)
            _norm(g, s, f"{p}{kind}.output.LayerNorm", QF_WIDTH)
        for branch in ("", "_query"):  # text path (unused) and query path
            _linear(g, s, f"{p}intermediate{branch}.dense", QF_MLP, QF_WIDTH)
            _linear(g, s, f"{p}output{branch}.dense", QF_WIDTH, QF_MLP)
            _norm(g, s, f"{p}output{branch}.LayerNorm", QF_WIDTH)
    _linear(g, s, "Qformer.cls.predictions.transform.dense", QF_WIDTH, QF_WIDTH)
    s["Qformer.cls.predictions.bias"] = _rand(g, 30)
    _linear(g, s, "vision_proj", 16, QF_WIDTH)
    _linear(g, s, "text_proj", 16, QF_WIDTH)
    _linear(g, s, "itm_head", 2, QF_WIDTH)
    s["temp"] = torch.tensor(0.07)
    _linear(g, s, "t5_proj", 24, QF_WIDTH)
    s["t5_model.shared.weight"] = _rand(g, 40, 24)
    return s


# --- independent reference forward (EVA ViT + ln_vision, BERT-style Q-Former) ---------------------------------------


def _ln(x: Tensor, s: dict, name: str, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], eps)


def _lin(x: Tensor, s: dict, name: str) -> Tensor:
    return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]


def _attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    b, n, d = q.shape
    q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, d)


def reference_vision(eva: dict, blip2: dict, image: Tensor, ln_vision_eps: float = LAVIS_LN_VISION_EPS) -> Tensor:
    x = F.conv2d(image, eva["patch_embed.proj.weight"], eva["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([eva["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + eva["pos_embed"]
    for i in range(USED_BLOCKS):
        b = f"blocks.{i}."
        h = _ln(x, eva, b + "norm1", EVA_BLOCK_EPS)
        w_q, w_k, w_v = eva[b + "attn.qkv.weight"].chunk(3)
        q = h @ w_q.T + eva[b + "attn.q_bias"]
        k = h @ w_k.T  # EVA: no key bias
        v = h @ w_v.T + eva[b + "attn.v_bias"]
        x = x + _lin(_attend(q, k, v, EVA_HEADS), eva, b + "attn.proj")
        h = _ln(x, eva, b + "norm2", EVA_BLOCK_EPS)
        x = x + _lin(F.gelu(_lin(h, eva, b + "mlp.fc1")), eva, b + "mlp.fc2")
    return _ln(x, blip2, "ln_vision", ln_vision_eps)


def reference_qformer(blip2: dict, image_features: Tensor) -> Tensor:
    eps = 1e-12
    queries = blip2["query_tokens"].expand(image_features.shape[0], -1, -1)
    x = _ln(queries, blip2, "Qformer.bert.embeddings.LayerNorm", eps)
    for i in range(QF_LAYERS):
        p = f"Qformer.bert.encoder.layer.{i}."
        sources = [("attention", None)] + ([("crossattention", image_features)] if i % CROSS_FREQ == 0 else [])
        for kind, memory in sources:
            kv = x if memory is None else memory
            a = _attend(_lin(x, blip2, f"{p}{kind}.self.query"), _lin(kv, blip2, f"{p}{kind}.self.key"),
                        _lin(kv, blip2, f"{p}{kind}.self.value"), QF_HEADS)
            x = _ln(_lin(a, blip2, f"{p}{kind}.output.dense") + x, blip2, f"{p}{kind}.output.LayerNorm", eps)
        h = _lin(F.gelu(_lin(x, blip2, f"{p}intermediate_query.dense")), blip2, f"{p}output_query.dense")
        x = _ln(h + x, blip2, f"{p}output_query.LayerNorm", eps)
    return x


# --- transformers side ------------------------------------------------------------------------------------------------


def tiny_configs():
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(
        hidden_size=EVA_WIDTH, intermediate_size=EVA_MLP, num_hidden_layers=USED_BLOCKS, num_attention_heads=EVA_HEADS,
        image_size=IMAGE, patch_size=PATCH, layer_norm_eps=1e-6, attention_dropout=0.0,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=QF_WIDTH, intermediate_size=QF_MLP, num_hidden_layers=QF_LAYERS, num_attention_heads=QF_HEADS,
        encoder_hidden_size=EVA_WIDTH, cross_attention_frequency=CROSS_FREQ,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return vision, qformer


def hf_features(state: dict, image: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Strict-load the converted weights into our vision builder and transformers' Q-Former, and run them."""
    from transformers import Blip2QFormerModel

    vision_cfg, qformer_cfg = tiny_configs()
    vision_sd, qformer_sd, query_tokens = split_blip2_state(state)
    vision, qformer = build_vision(vision_cfg).eval(), Blip2QFormerModel(qformer_cfg).eval()
    vision.load_state_dict(vision_sd, strict=True)
    qformer.load_state_dict(qformer_sd, strict=True)
    vision, qformer, query_tokens = vision.to(dtype), qformer.to(dtype), query_tokens.to(dtype)
    with torch.no_grad():
        image_features = vision(pixel_values=image.to(dtype)).last_hidden_state
        queries = qformer(
            query_embeds=query_tokens.expand(image.shape[0], -1, -1), encoder_hidden_states=image_features
        ).last_hidden_state
    return image_features, queries


def _double(state: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


@pytest.fixture(scope="module")
def lavis() -> tuple[dict, dict]:
    return make_eva_state(), make_blip2_state()


@pytest.fixture(scope="module")
def image() -> Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=_gen(7))


def test_converted_weights_reproduce_lavis_features(lavis, image) -> None:
    """In float64, so that ln_vision's eps (1e-5 in LAVIS, 1e-6 in a plain Blip2VisionModel) decides the outcome."""
    eva, blip2 = (_double(d) for d in lavis)
    state, _ = lavis_to_hf_blip2(eva, blip2, num_vision_layers=USED_BLOCKS, cross_attention_frequency=CROSS_FREQ)
    image_features, queries = hf_features(state, image, torch.float64)
    ref_features = reference_vision(eva, blip2, image.double())
    ref_queries = reference_qformer(blip2, ref_features)
    assert queries.shape == (2, QUERIES, QF_WIDTH)
    assert (image_features - ref_features).abs().max().item() <= 1e-10
    assert (queries - ref_queries).abs().max().item() <= 1e-10
    block_eps_features = reference_vision(eva, blip2, image.double(), ln_vision_eps=EVA_BLOCK_EPS)
    assert (image_features - block_eps_features).abs().max().item() > 1e-7  # the check above can see the eps


@pytest.mark.parametrize("preset", sorted(VISION_PRESETS))
def test_post_layernorm_has_lavis_eps_in_every_preset(preset: str) -> None:
    with torch.device("meta"):  # eva-vit-g is 1B parameters: shapes only
        vision = build_vision(preset)
    assert vision.post_layernorm.eps == LAVIS_LN_VISION_EPS
    block_norms = [m for layer in vision.encoder.layers for m in (layer.layer_norm1, layer.layer_norm2)]
    assert block_norms and all(m.eps == EVA_BLOCK_EPS for m in block_norms)


def test_ignored_keys_are_reported(lavis) -> None:
    eva, blip2 = lavis
    state, ignored = lavis_to_hf_blip2(eva, blip2, num_vision_layers=USED_BLOCKS)
    assert "eva:blocks.2.attn.qkv.weight" in ignored  # BLIP-2 drops EVA's last block
    layer = "Qformer.bert.encoder.layer."
    text_path = (f"{layer}0.intermediate.dense.weight", f"{layer}1.output.LayerNorm.bias",
                 "Qformer.bert.embeddings.word_embeddings.weight", "Qformer.cls.predictions.bias")
    heads_and_t5 = ("itm_head.weight", "vision_proj.weight", "temp", "t5_proj.weight", "t5_model.shared.weight")
    for key in text_path + heads_and_t5:
        assert f"blip2:{key}" in ignored
    assert not any("_query" in k or ".attention." in k or "crossattention" in k for k in ignored)
    used = len(eva) + len(blip2) - len(ignored)
    assert used == len(state) + USED_BLOCKS  # q_bias + v_bias become one qkv.bias per block


def test_pth_files_and_embedded_visual_encoder(lavis, tmp_path) -> None:
    eva, blip2 = lavis
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    torch.save({"model": blip2}, tmp_path / "blip2.pth")
    from_files, _ = load_blip2_vision_side(tmp_path / "eva_vit_g.pth", tmp_path / "blip2.pth", USED_BLOCKS)
    # A fine-tuned LAVIS checkpoint embeds the vision encoder; then eva_vit_g.pth is not needed.
    embedded = blip2 | {f"visual_encoder.{k}": v for k, v in eva.items()}
    torch.save({"model": embedded}, tmp_path / "blip2_full.pth")
    from_embedded, ignored = load_blip2_vision_side(None, tmp_path / "blip2_full.pth", num_vision_layers=USED_BLOCKS)
    assert from_files.keys() == from_embedded.keys()
    assert all(torch.equal(from_files[k], from_embedded[k]) for k in from_files)
    assert "blip2:visual_encoder.blocks.2.mlp.fc1.weight" in ignored
    assert not any(k.startswith("blip2:visual_encoder.blocks.1.") for k in ignored)
    torch.save([eva], tmp_path / "list.pth")
    with pytest.raises(CheckpointKeyError, match="list.pth holds a list, not a state dict"):
        load_blip2_vision_side(tmp_path / "list.pth", tmp_path / "blip2.pth", USED_BLOCKS)


@pytest.mark.parametrize(
    ("source", "key", "ours", "file_hint"),
    [
        ("blip2", "Qformer.bert.encoder.layer.1.output_query.dense.weight",
         "qformer.encoder.layer.1.output_query.dense.weight", "blip2_pretrained"),
        ("blip2", "Qformer.bert.encoder.layer.0.crossattention.self.key.bias",
         "qformer.encoder.layer.0.crossattention.attention.key.bias", "blip2_pretrained"),
        ("blip2", "ln_vision.weight", "vision_model.post_layernorm.weight", "blip2_pretrained"),
        ("eva", "blocks.1.attn.q_bias", "vision_model.encoder.layers.1.self_attn.qkv.bias", "eva_vit_g.pth"),
    ],
)
def test_missing_key_is_named(lavis, source: str, key: str, ours: str, file_hint: str) -> None:
    eva, blip2 = (dict(d) for d in lavis)
    del (blip2 if source == "blip2" else eva)[key]
    with pytest.raises(CheckpointKeyError) as err:
        lavis_to_hf_blip2(eva, blip2, num_vision_layers=USED_BLOCKS)
    message = str(err.value)
    assert "\n" not in message and file_hint in message
    assert f"needs 1 key(s) the checkpoint lacks, the first {source}:{key} (ours: {ours})" in message


@pytest.mark.parametrize(
    ("source", "key", "ours", "shape"),
    [
        ("eva", "blocks.1.mlp.fc1.weight", "vision_model.encoder.layers.1.mlp.fc1.weight", (EVA_MLP + 1, EVA_WIDTH)),
        # an odd tensor that a size is read off: the size most tensors agree on wins, so this one is named
        ("eva", "cls_token", "vision_model.embeddings.class_embedding", (1, 1, EVA_WIDTH + 2)),
        ("eva", "pos_embed", "vision_model.embeddings.position_embedding", (1, (IMAGE // PATCH) ** 2 + 2, EVA_WIDTH)),
        ("blip2", "ln_vision.weight", "vision_model.post_layernorm.weight", (EVA_WIDTH - 8,)),
        ("blip2", "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
         "qformer.encoder.layer.0.crossattention.attention.key.weight", (QF_WIDTH, EVA_WIDTH - 8)),
        ("blip2", "Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight",
         "qformer.encoder.layer.1.output_query.LayerNorm.weight", (QF_WIDTH + 1,)),
        ("blip2", "query_tokens", "query_tokens", (1, QUERIES, QF_WIDTH + 1)),
    ],
)
def test_wrong_shape_is_named_in_one_line(lavis, source: str, key: str, ours: str, shape: tuple) -> None:
    eva, blip2 = (dict(d) for d in lavis)
    state = blip2 if source == "blip2" else eva
    expected = list(state[key].shape)
    state[key] = torch.zeros(shape)
    with pytest.raises(CheckpointKeyError) as err:
        lavis_to_hf_blip2(eva, blip2, num_vision_layers=USED_BLOCKS)
    message = str(err.value)
    assert "\n" not in message and "re-download" in message
    assert f"{source}:{key} (ours: {ours}) has shape {list(shape)}, expected {expected}" in message


def test_q_and_v_bias_of_different_shapes_are_named(lavis) -> None:
    eva, blip2 = lavis
    with pytest.raises(CheckpointKeyError, match=r"^eva:blocks\.0\.attn\.q_bias \+ blocks\.0\.attn\.v_bias \(ours: "
                       r"vision_model\.encoder\.layers\.0\.self_attn\.qkv\.bias\) have shapes \[1, 48\] and \[48\]"):
        lavis_to_hf_blip2(eva | {"blocks.0.attn.q_bias": torch.zeros(1, EVA_WIDTH)}, blip2, USED_BLOCKS)


def _target(vision_preset: str, qformer_preset: str, queries: int) -> dict[str, Tensor]:
    """What build_model's load path checks against: the model's parameters (meta: shapes only), LLM side included."""
    from minigpt4qwen.models.qformer import build_qformer

    with torch.device("meta"):
        vision = build_vision(vision_preset)
        qformer, query_tokens = build_qformer(qformer_preset, vision.config.hidden_size, queries)
    return ({f"vision_model.{k}": p for k, p in vision.named_parameters()}
            | {f"qformer.{k}": p for k, p in qformer.named_parameters()}
            | {"query_tokens": query_tokens, "llm_proj.weight": torch.zeros(2, QF_WIDTH)})


def test_files_of_another_size_than_the_model_name_the_config_key(lavis, tmp_path, monkeypatch) -> None:
    from minigpt4qwen.models.qformer import QFORMER_PRESETS

    eva, blip2 = lavis
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    torch.save({"model": blip2}, tmp_path / "blip2.pth")
    monkeypatch.setitem(VISION_PRESETS, "lavis-test", {
        "hidden_size": EVA_WIDTH, "intermediate_size": EVA_MLP, "num_hidden_layers": USED_BLOCKS,
        "num_attention_heads": EVA_HEADS, "image_size": IMAGE, "patch_size": PATCH, "layer_norm_eps": 1e-6})
    monkeypatch.setitem(QFORMER_PRESETS, "one-layer", QFORMER_PRESETS["tiny"] | {"num_hidden_layers": 1})

    def load(vision: str, qformer: str, queries: int) -> dict:
        return load_blip2_vision_side(tmp_path / "eva_vit_g.pth", tmp_path / "blip2.pth", USED_BLOCKS, CROSS_FREQ,
                                      target=_target(vision, qformer, queries))[0]

    state, _ = lavis_to_hf_blip2(eva, blip2, USED_BLOCKS, CROSS_FREQ)
    loaded = load("lavis-test", "tiny", QUERIES)  # the fixture's sizes: tiny is its Q-Former
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    cases = [
        (("tiny", "tiny", QUERIES),
         r"^eva:cls_token \(ours: vision_model\.embeddings\.class_embedding\) has shape \[1, 1, 48\], expected "
         r"\[1, 1, 32\] \(the model the config builds\);.*check model\.vision$"),
        (("lavis-test", "tiny", 8),
         r"^blip2:query_tokens \(ours: query_tokens\) has shape \[1, 4, 32\], expected \[1, 8, 32\].*"
         r"model\.num_query_tokens"),
        (("lavis-test", "one-layer", QUERIES),
         r"^blip2:Qformer\.bert\.encoder\.layer\.1\.attention\.self\.query\.weight \(ours: qformer\.encoder\.layer\.1\."
         r"attention\.attention\.query\.weight\) and 15 more weight\(s\) have no place in the model.*"
         r"check model\.qformer$"),
    ]
    for args, message in cases:
        with pytest.raises(CheckpointKeyError, match=message) as err:
            load(*args)
        assert "\n" not in str(err.value)


def test_too_few_eva_blocks_and_wrong_cross_frequency(lavis) -> None:
    eva, blip2 = lavis
    with pytest.raises(CheckpointKeyError, match=r"blocks\.3\.norm1\.weight"):
        lavis_to_hf_blip2(eva, blip2, num_vision_layers=4)
    with pytest.raises(CheckpointKeyError, match=r"layers \[1\].*cross_attention_frequency=2"):
        lavis_to_hf_blip2(eva, _with_cross_on_layer_1(blip2), num_vision_layers=USED_BLOCKS)
    with pytest.raises(CheckpointKeyError, match="no EVA"):
        lavis_to_hf_blip2(None, blip2)


def _with_cross_on_layer_1(blip2: dict) -> dict:
    return blip2 | {k.replace("layer.0.", "layer.1."): v for k, v in blip2.items() if "layer.0.crossattention" in k}


def test_hf_blip2_dir_round_trip(lavis, tmp_path) -> None:
    """Converted weights fit transformers' full Blip2Model names; its saved directory reads back to the same tensors."""
    from transformers import Blip2Config, Blip2Model, OPTConfig

    eva, blip2 = lavis
    state, _ = lavis_to_hf_blip2(eva, blip2, num_vision_layers=USED_BLOCKS)
    vision_cfg, qformer_cfg = tiny_configs()
    text_cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                         word_embed_proj_dim=16, max_position_embeddings=32)
    model = Blip2Model(Blip2Config(vision_config=vision_cfg.to_dict(), qformer_config=qformer_cfg.to_dict(),
                                   text_config=text_cfg.to_dict(), num_query_tokens=QUERIES))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert missing and all(k.startswith(("language_projection.", "language_model.")) for k in missing)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded, with model.safetensors.index.json
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    loaded, ignored = load_hf_blip2_dir(tmp_path / "hf")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert ignored and all(k.startswith(("language_projection.", "language_model.")) for k in ignored)
    # Single-file pickled variant.
    (tmp_path / "bin").mkdir()
    torch.save(state | {"language_projection.weight": torch.zeros(2, 2)}, tmp_path / "bin" / "pytorch_model.bin")
    loaded_bin, ignored_bin = load_hf_blip2_dir(tmp_path / "bin")
    assert loaded_bin.keys() == state.keys() and ignored_bin == ["language_projection.weight"]
