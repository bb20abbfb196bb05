"""Our composite model as transformers' own ``Blip2ForConditionalGeneration``, its prompt as a Jinja chat template.

    minigpt4qwen convert to-transformers --checkpoint runs/minigpt4qwen-7b --out exported/minigpt4qwen-7b-hf

The parts map one to one, by module and not by renaming (``to_blip2`` puts our module objects into the transformers
model, so what is saved is what ran):

========================  ==============================  =====================================================
ours                      Blip2ForConditionalGeneration   difference
========================  ==============================  =====================================================
``vision_model``          ``vision_model``                the same ``Blip2VisionModel``; both apply
                                                          ``post_layernorm`` (= LAVIS ``ln_vision``) to the last
                                                          hidden state. Ours gives it LAVIS's eps 1e-5;
                                                          ``Blip2VisionConfig`` has one eps for every vision norm,
                                                          so transformers uses the blocks' 1e-6 there too.
``query_tokens``          ``query_tokens``                none
``qformer``               ``qformer``                     the same ``Blip2QFormerModel`` and call (queries,
                                                          image states, all-ones image mask); loaded in fp16,
                                                          transformers keeps it and the queries in fp32
                                                          (``_keep_in_fp32_modules``), ours would not.
``llm_proj``              ``language_projection``         saved in the export's one dtype; ours keeps a trained
                                                          projector in fp32 beside a bf16 LLM on CUDA
``llm`` (+ LoRA)          ``language_model``              ``AutoModelForCausalLM`` from ``text_config``, LoRA
                                                          merged into the weights (ours adds it on the fly)
image placeholders        ``image_token_index`` runs      none: both ``masked_scatter`` the projected queries
                                                          over the placeholder ids, image after image, in order
========================  ==============================  =====================================================

In fp32 on the CPU they gave the same greedy tokens in tests/test_to_transformers.py; the eps and dtype
differences above are rounding-level. Generation stops where ours does: ``text_config.eos_token_id`` holds our stop
ids (``<|im_end|>`` and the tokenizer's eos), which is what transformers 5 hands ``language_model.generate``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...data.conversation import IMAGE_MARKER, IMAGE_PROMPT, ChatTemplate, Turn

__all__ = ["ChatTemplateMismatch", "blip2_chat_template", "blip2_image_processor", "check_chat_template",
           "grow_embeddings", "to_blip2"]

#: Conversations the exported chat template must render to exactly our token ids (one image, then a follow-up).
PROBES = (
    [Turn("user", f"{IMAGE_PROMPT} What is in the image?")],
    [Turn("user", f"{IMAGE_PROMPT} Describe it."), Turn("assistant", "A red circle."),
     Turn("user", "And where is it?")],
)


class ChatTemplateMismatch(ValueError):
    """The Jinja chat template, rendered and tokenized whole, does not give our template's token ids."""


def _jinja_str(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def blip2_chat_template(template: ChatTemplate, image_token: str) -> str:
    """A Jinja chat template that renders the prompt ``template`` builds.

    Message content may be a string or a list of parts: ``{"type": "image"}`` becomes ``<Img>`` + ``num_query_tokens``
    image tokens + ``</Img>``, text parts their text, parts joined by one space (the order chat and the API use). With
    no system message first, the run's system prompt is put in (ours always uses it; a system message given here
    replaces it). ChatML runs get ChatML with turns joined by a newline, as Qwen's ``make_context``; runs on another
    tokenizer's template get that template, fed the same flattened messages.
    """
    image = IMAGE_PROMPT.replace(IMAGE_MARKER, image_token * template.num_query_tokens)
    lines = [  # every tag trims the whitespace around it: the line breaks are for the reader only
        "{%- macro render(content) -%}",
        "  {%- if content is string -%}{{ content }}{%- else -%}",
        "    {%- set parts = namespace(items=[]) -%}",
        "    {%- for part in content -%}",
        "      {%- if part['type'] == 'image' -%}{%- set parts.items = parts.items + [" + _jinja_str(image) + "] -%}",
        "      {%- elif part['type'] == 'text' and part['text'] -%}{%- set parts.items = parts.items + [part['text']] -%}",
        "      {%- endif -%}",
        "    {%- endfor -%}{{ parts.items | join(' ') }}",
        "  {%- endif -%}",
        "{%- endmacro -%}",
        "{%- set flat = namespace(messages=[]) -%}",
    ]
    if template.system_prompt:
        lines += [
            "{%- if not messages or messages[0]['role'] != 'system' -%}",
            "  {%- set flat.messages = [{'role': 'system', 'content': " + _jinja_str(template.system_prompt) + "}] -%}",
            "{%- endif -%}",
        ]
    lines += [
        "{%- for message in messages -%}",
        "  {%- set flat.messages = flat.messages + [{'role': message['role'], 'content': render(message['content'])}] -%}",
        "{%- endfor -%}",
        "{%- set messages = flat.messages -%}",
    ]
    if template.style != "chatml":
        return "\n".join(lines) + "\n" + template.tokenizer.chat_template
    lines += [
        "{%- for message in messages -%}",
        "  {%- if not loop.first -%}{{ '\\n' }}{%- endif -%}",
        "  {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{ '\\n<|im_start|>assistant\\n' }}{%- endif -%}",
    ]
    return "\n".join(lines) + "\n"


def check_chat_template(tokenizer, template: ChatTemplate) -> None:
    """``tokenizer`` (carrying the exported chat template) renders and tokenizes the probe conversations to our ids.

    Ours encodes the prompt piece by piece (as Qwen's ``make_context``); transformers tokenizes the rendered text
    whole. The two agree when the pieces fall on pre-tokenizer boundaries, which holds for Qwen's and byte-level
    BPE's split rules; this checks it for the tokenizer at hand instead of assuming it.
    """
    for turns in PROBES:
        ours = template.encode(turns, add_generation_prompt=True).input_ids
        messages = [{"role": t.role, "content": _parts(t.content)} for t in turns]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
        if theirs != ours:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise ChatTemplateMismatch(
                f"the exported chat template tokenizes to other ids than the run's template (first difference at "
                f"token {at}: {theirs[at:at + 3]} instead of {ours[at:at + 3]}, rendered {text[:80]!r}...); this "
                f"tokenizer ({type(tokenizer).__name__}, template style {template.style}) needs data.template=chatml "
                "or a template written for it"
            )


def _parts(content: str) -> list[dict]:
    """A turn's text as message parts: each image prompt an image part, the rest text parts."""
    out: list[dict] = []
    for i, piece in enumerate(content.split(IMAGE_PROMPT)):
        if i:
            out.append({"type": "image"})
        if piece.strip():
            out.append({"type": "text", "text": piece.strip()})
    return out


def grow_embeddings(llm: nn.Module, token_id: int) -> list[int]:
    """Make room for ``token_id`` in the LLM's embedding table; returns the ids added.

    Ours never looks the image token up (its positions are masked before the lookup), so a token added to the
    tokenizer may lie past the table (SmolLM2). Blip2ForConditionalGeneration embeds every input id first, so the
    export needs the row. New rows are zero: their logit is 0 for every hidden state, so greedy answers stay ours as
    long as some real token scores above 0; ``suppress_tokens=ids`` in ``generate`` rules them out entirely.
    """
    old = llm.get_input_embeddings().num_embeddings
    if token_id < old:
        return []
    llm.resize_token_embeddings(token_id + 1, mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[old:].zero_()
        llm.get_output_embeddings().weight[old:].zero_()
    return list(range(old, token_id + 1))


def to_blip2(model, stop_token_ids: list[int], pad_token_id: int | None, bos_token_id: int | None = None):
    """(``Blip2ForConditionalGeneration`` made of ``model``'s own modules, no copy; ids ``grow_embeddings`` added).

    LoRA adapters are merged into the LLM's weights first and ``model.llm`` becomes the merged plain model, so
    ``model`` itself should not answer afterwards.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, GenerationConfig

    llm = model.llm.merge_and_unload() if hasattr(model.llm, "merge_and_unload") else model.llm
    model.llm = llm
    added = grow_embeddings(llm, model.image_token_id)
    text = llm.config
    # transformers 5 builds language_model.generation_config from these text_config fields (not generation_config.json)
    text.eos_token_id = list(stop_token_ids)
    text.pad_token_id = pad_token_id
    text.bos_token_id = bos_token_id
    config = Blip2Config(vision_config=model.vision_model.config.to_dict(), qformer_config=model.qformer.config.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=model.num_query_tokens,
                         image_token_index=model.image_token_id)
    with torch.device("meta"):  # the shell only: every part is replaced by ours below
        hf = Blip2ForConditionalGeneration(config)
    hf.vision_model, hf.qformer, hf.query_tokens = model.vision_model, model.qformer, model.query_tokens
    hf.language_projection, hf.language_model = model.llm_proj, llm
    hf.generation_config = GenerationConfig(eos_token_id=list(stop_token_ids), pad_token_id=pad_token_id,
                                            bos_token_id=bos_token_id, suppress_tokens=added or None)
    return hf.eval(), added


def blip2_image_processor(size: int):
    """transformers' BLIP image processor set to ours (data/images.py): resize to size x size with PIL bicubic,
    scale to [0, 1], CLIP mean/std. Its PIL backend gives bit-identical pixel values; the torchvision backend (what
    ``AutoImageProcessor`` picks when torchvision is installed) resizes with torch's bicubic, a little differently."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from ...data.images import CLIP_MEAN, CLIP_STD

    return BlipImageProcessorPil(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_resize=True,
                                 do_rescale=True, do_normalize=True, do_convert_rgb=True)
