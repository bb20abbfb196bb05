"""Format conversions for real checkpoints, written as pure functions over state dicts.

Two published formats are not what transformers' modules load, and we use the library's modules rather than vendored
copies (ARCHITECTURE rule 7), so their weights are renamed here once:

* LAVIS BLIP-2, the vision side MiniGPT-4 used: EVA ViT-g in ``eva_vit_g.pth`` and the Q-Former in
  ``blip2_pretrained_flant5xxl.pth``. ``lavis_to_hf_blip2`` gives them ``Blip2Model`` names, so the frozen vision side
  is ``Blip2VisionModel`` + ``Blip2QFormerModel``. An HF-format BLIP-2 directory is read with ``load_hf_blip2_dir``.
* Qwen-1 (Qwen-7B-Chat, Qwen-14B-Chat) ships remote code and a tiktoken vocabulary. ``convert_qwen1_dir`` writes a
  native Qwen2 directory (weights, config, fast tokenizer, ChatML template) that loads without ``trust_remote_code``.

Every converter checks names and shapes against the module it feeds (built on the meta device) before it returns, so
a file of another size fails here, in one line naming the source key, our key and both shapes, and not later inside
transformers or after a half-written output folder.

Usage:
    python -c "from minigpt4qwen.models.convert import convert_qwen1_dir as c; c('Qwen-7B-Chat', 'qwen7b-chat-hf')"
"""

from .common import CheckpointKeyError, read_state_dir
from .lavis import (
    blip2_configs_from_state,
    blip2_param_shapes,
    lavis_to_hf_blip2,
    load_blip2_vision_side,
    load_hf_blip2_dir,
    split_blip2_state,
)
from .qwen1 import (
    CHATML_TEMPLATE,
    QWEN1_PATTERN,
    QWEN1_SPECIAL_START_ID,
    QWEN1_SPECIAL_TOKENS,
    convert_qwen1_dir,
    load_qwen1_dir,
    qwen1_config_to_qwen2,
    qwen1_to_qwen2_state,
    qwen_tiktoken_to_fast,
)

__all__ = [
    "CHATML_TEMPLATE",
    "CheckpointKeyError",
    "QWEN1_PATTERN",
    "QWEN1_SPECIAL_START_ID",
    "QWEN1_SPECIAL_TOKENS",
    "blip2_configs_from_state",
    "blip2_param_shapes",
    "convert_qwen1_dir",
    "lavis_to_hf_blip2",
    "load_blip2_vision_side",
    "load_hf_blip2_dir",
    "load_qwen1_dir",
    "qwen1_config_to_qwen2",
    "qwen1_to_qwen2_state",
    "qwen_tiktoken_to_fast",
    "read_state_dir",
    "split_blip2_state",
]

