"""The one place that turns a conversation into token ids + labels: used by training, chat, web UI, API and eval.

Qwen-style tokenizers get ChatML built piece by piece exactly like Qwen-7B-Chat's own `make_context`
(im_start + encode(role) + encode("\\n") + encode(content) + im_end, turns joined by "\\n"); any other tokenizer gets
its own chat template, rendered with apply_chat_template and split into user/assistant pieces by prefix differences.

Every `<ImageHere>` marker in a user turn becomes `num_query_tokens` copies of the image placeholder id; the model
overwrites those positions with projected image features. Labels are -100 everywhere except each assistant answer
and its end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_MARKER = "<ImageHere>"
IMAGE_PROMPT = "<Img><ImageHere></Img>"
IGNORE_INDEX = -100
_SENTINEL = "\uE000IMG\uE000"  # private-use characters: never produced by real text


class OverlongError(ValueError):
    """The part of a conversation that cannot be dropped does not fit the text budget."""


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    """Image markers kept (images beyond this belong to dropped turns)."""
    truncated: bool = False
    dropped_turns: int = 0
    text_len: int = 0
    kept_images: list[int] = field(default_factory=list)
    """Indices (in marker order over the whole conversation) of the images whose placeholders were kept."""


@dataclass
class _Block:
    """One message rendered: token ids, labels, images it holds."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    images: int = 0
    role: str = ""
    first_image: int = 0

    def add(self, ids: list[int], supervised: bool = False) -> None:
        self.ids += ids
        self.labels += ids if supervised else [IGNORE_INDEX] * len(ids)


def has_chatml(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return "<|im_start|>" in vocab and "<|im_end|>" in vocab


class ChatTemplate:
    """Encode conversations for one tokenizer; `style` is chatml | tokenizer | auto."""

    def __init__(
        self,
        tokenizer,
        image_token_id: int,
        num_query_tokens: int,
        system_prompt: str = "You are a helpful assistant.",
        style: str = "auto",
    ) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_query_tokens = num_query_tokens
        self.system_prompt = system_prompt
        if style == "auto":
            style = "chatml" if has_chatml(tokenizer) else "tokenizer"
        if style == "chatml" and not has_chatml(tokenizer):
            raise ValueError("template 'chatml' needs <|im_start|> and <|im_end|> in the tokenizer's vocabulary")
        if style == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; use data.template=chatml or a chat model")
        self.style = style
        if style == "chatml":
            self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
            self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
            self.nl = self._enc("\n")

    # ------------------------------------------------------------------ pieces

    def _enc(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _content(self, block: _Block, text: str, supervised: bool) -> None:
        """Add text whose image markers become placeholder runs (never supervised)."""
        parts = text.split(IMAGE_MARKER)
        for i, part in enumerate(parts):
            if i:
                block.add([self.image_token_id] * self.num_query_tokens)
                block.images += 1
            block.add(self._enc(part), supervised)

    @property
    def stop_token_ids(self) -> list[int]:
        ids = [self.im_end] if self.style == "chatml" else []
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    def _blocks_chatml(self, turns: list[Turn], add_generation_prompt: bool) -> tuple[_Block, list[_Block], _Block]:
        head = _Block(role="system")
        if self.system_prompt:
            head.add([self.im_start] + self._enc("system") + self.nl + self._enc(self.system_prompt) + [self.im_end])
        blocks = []
        for i, turn in enumerate(turns):
            b = _Block(role=turn.role)
            b.add((self.nl if (i or self.system_prompt) else []) + [self.im_start] + self._enc(turn.role) + self.nl)
            supervised = turn.role == "assistant"
            self._content(b, turn.content, supervised)
            b.add([self.im_end], supervised)
            blocks.append(b)
        tail = _Block(role="generation")
        if add_generation_prompt:
            tail.add(self.nl + [self.im_start] + self._enc("assistant") + self.nl)
        return head, blocks, tail

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _blocks_tokenizer(self, turns: list[Turn], add_generation_prompt: bool) -> tuple[_Block, list[_Block], _Block]:
        """Split the tokenizer's own template into per-message strings by rendering growing prefixes."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        base = len(messages)
        messages += [{"role": t.role, "content": t.content.replace(IMAGE_MARKER, _SENTINEL)} for t in turns]
        prev = self._render(messages[:base], False) if base else ""
        head = _Block(role="system")
        head.add(self._enc(prev))
        blocks = []
        for i, turn in enumerate(turns):
            b = _Block(role=turn.role)
            msgs = messages[: base + i + 1]
            if turn.role == "assistant":
                opener = self._render(msgs[:-1], True)
                if not opener.startswith(prev):
                    raise ValueError("the tokenizer's chat template is not prefix-stable; use data.template=chatml")
                b.add(self._enc(opener[len(prev):]))
                prev = opener
            full = self._render(msgs, False)
            if not full.startswith(prev):
                raise ValueError("the tokenizer's chat template is not prefix-stable; use data.template=chatml")
            self._content(b, full[len(prev):].replace(_SENTINEL, IMAGE_MARKER), turn.role == "assistant")
            prev = full
            blocks.append(b)
        tail = _Block(role="generation")
        if add_generation_prompt:
            tail.add(self._enc(self._render(messages, True)[len(prev):]))
        return head, blocks, tail

    # ------------------------------------------------------------------ public

    def encode(
        self, turns: list[Turn], max_txt_len: int | None = None, add_generation_prompt: bool = False
    ) -> Encoded:
        """Token ids + labels for `turns`.

        Training (add_generation_prompt=False): over-long samples lose whole trailing turns, then the tail of the
        last answer; an image placeholder is never cut. Generation: the oldest turns after the first (which holds
        the image) are dropped. Either way the text budget counts text tokens only.
        """
        if not turns:
            raise ValueError("empty conversation")
        build = self._blocks_chatml if self.style == "chatml" else self._blocks_tokenizer
        head, blocks, tail = build(turns, add_generation_prompt)

        def text_len(bs: list[_Block]) -> int:
            return sum(len(b.ids) - b.images * self.num_query_tokens for b in bs)

        start = 0
        for b in blocks:  # remember which images each block holds before any is dropped
            b.first_image, start = start, start + b.images
        truncated, dropped = False, 0
        if max_txt_len is not None and text_len([head, *blocks, tail]) > max_txt_len:
            truncated = True
            if add_generation_prompt:
                # keep the first exchange (images usually live there) and the newest question
                while text_len([head, *blocks, tail]) > max_txt_len and len(blocks) > 3:
                    del blocks[2:4]
                    dropped += 2
            else:
                while text_len([head, *blocks]) > max_txt_len and sum(b.role == "assistant" for b in blocks) > 1:
                    blocks.pop()
                    dropped += 1
                while blocks and blocks[-1].role != "assistant":
                    blocks.pop()
                    dropped += 1
                over = text_len([head, *blocks]) - max_txt_len
                last = blocks[-1] if blocks else None
                if over > 0 and last is not None and last.role == "assistant":
                    answer = sum(1 for x in last.labels if x != IGNORE_INDEX)
                    if over < answer:
                        last.ids, last.labels = last.ids[:-over], last.labels[:-over]
            n = text_len([head, *blocks, tail])
            if n > max_txt_len:
                raise OverlongError(
                    f"prompt needs {n} text tokens but max_txt_len is {max_txt_len}: raise max_txt_len, shorten the "
                    "question" + (" or clear the history" if add_generation_prompt else "")
                )
        ids: list[int] = []
        labels: list[int] = []
        for b in [head, *blocks, tail]:
            ids += b.ids
            labels += b.labels
        kept = [b.first_image + k for b in blocks for k in range(b.images)]
        return Encoded(ids, labels, len(kept), truncated, dropped, text_len([head, *blocks, tail]), kept)
