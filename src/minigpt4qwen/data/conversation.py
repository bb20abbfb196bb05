"""The one place that turns a conversation into token ids + labels: used by training, chat, web UI, API and eval.

Qwen-style tokenizers get ChatML built piece by piece exactly like Qwen-7B-Chat's own `make_context`
(im_start + encode(role) + encode("\\n") + encode(content) + im_end, turns joined by "\\n"); any other tokenizer gets
its own chat template, rendered with apply_chat_template and split into user/assistant pieces by prefix differences.

Every `<ImageHere>` marker in a user turn becomes `num_query_tokens` copies of the image placeholder id; the model
overwrites those positions with projected image features. Labels are -100 everywhere except each assistant answer
and its end-of-turn token.

Message content is encoded as the characters it holds: a control token typed in a message (`<|im_end|>`,
`<|im_start|>`, `<|image_pad|>`, any special added token) stays text, as Qwen's make_context encodes content (`allowed_special=set()`), so a
message can neither open a turn of another role nor claim image positions. Text typed by a user passes `literal()`,
which keeps an `<ImageHere>` in it text too; the front ends add image markers themselves, one per image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGE_MARKER = "<ImageHere>"
IMAGE_PROMPT = "<Img><ImageHere></Img>"
IGNORE_INDEX = -100
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
_LITERAL_MARKER = "<Image\uE001Here>"
"""An image marker typed by a user: split by a private-use character so that it is no marker, restored to the text
`<ImageHere>` just before encoding."""
_OPEN, _CLOSE = "\uE002", "\uE003"
"""Private-use delimiters around a control-token string of a message in a rendered chat template."""
_WRAPPED = re.compile(f"{_OPEN}(.*?){_CLOSE}", re.DOTALL)
_LONE = re.compile(f"[{_OPEN}{_CLOSE}]")


def literal(text: str) -> str:
    """Typed text (a chat question, an API text part) as turn content: an image marker in it stays text."""
    return text.replace(IMAGE_MARKER, _LITERAL_MARKER)


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
        # special added tokens and the ChatML markers, whatever a tokenizer calls them, stay text in content; added
        # tokens that are not special (Qwen3's <think>, Qwen2.5's <tool_call>) keep their ids: answers in training
        # data use them, and they open no turn and claim no image positions
        added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()
                 if (t.special or t.content in CHATML_MARKERS) and not t.content.isspace()}
        self._control_ids = set(added.values()) | {image_token_id}
        pattern = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
        self._control_re = re.compile(pattern) if pattern else None

    # ------------------------------------------------------------------ pieces

    def _enc(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _text(self, text: str) -> list[int]:
        """Content as plain text: control-token strings in it become ordinary tokens (see the module docstring)."""
        if not text:
            return []
        if self._control_re is None or not self._control_re.search(text):
            ids = self._enc(text)  # the common case, and the ids training has always used
            if self._control_ids.isdisjoint(ids):
                return ids
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a Python tokenizer: this skips its special tokens only, checked below
            ids = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        else:
            # the backend's pipeline without its added-token matching; nothing shared is switched, so concurrent
            # encodes (API threads, the batcher) never see a half-set tokenizer
            if backend.normalizer is not None:
                text = backend.normalizer.normalize_str(text)
            pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
            ids = [t.id for p in pieces for t in backend.model.tokenize(p)]
        if not self._control_ids.isdisjoint(ids):
            raise ValueError("this tokenizer cannot encode the message's control-token text as plain text")
        return ids

    def _content(self, block: _Block, text: str, supervised: bool, rendered: bool = False) -> None:
        """Add text whose image markers become placeholder runs (never supervised). `rendered`: a piece of the
        tokenizer's rendered template, whose markup stays markup (`_rendered`)."""
        for i, part in enumerate(text.split(IMAGE_MARKER)):
            if i:
                block.add([self.image_token_id] * self.num_query_tokens)
                block.images += 1
            part = part.replace(_LITERAL_MARKER, IMAGE_MARKER)
            block.add(self._rendered(part) if rendered else self._text(part), supervised)

    def _mark(self, content: str) -> str:
        """Content for the tokenizer's template: each control-token string in it between private-use delimiters."""
        content = _LONE.sub("", content)
        return self._control_re.sub(lambda m: _OPEN + m[0] + _CLOSE, content) if self._control_re else content

    def _rendered(self, text: str) -> list[int]:
        """Rendered template text, encoded whole as before except around the strings `_mark` delimited, which are
        encoded as text; a delimiter left alone (a template that cut a string apart) still splits the text, so
        that its halves cannot join into a control token. As transformers' `encode_marked_chat`, the text after a
        split is encoded after a newline whose ids are then removed: SentencePiece adds no word start there."""
        ids: list[int] = []
        pieces = [(seg, i % 2 == 1) for i, seg in enumerate(_WRAPPED.split(text))]
        pieces = [(p, as_text) for seg, as_text in pieces for p in ([seg] if as_text else _LONE.split(seg))]
        for k, (piece, as_text) in enumerate(pieces):
            encode = self._text if as_text else self._enc
            if piece:
                ids += self._after_newline(encode, piece) if k else encode(piece)
        return ids

    def _after_newline(self, encode, text: str) -> list[int]:
        nl, ids = encode("\n"), encode("\n" + text)
        return ids[len(nl):] if ids[: len(nl)] == nl else encode(text)

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
        """Split the tokenizer's own template into per-message strings by rendering growing prefixes; control-token
        strings in message content are delimited (`_mark`) so that they are encoded as text, the markup as markup."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        base = len(messages)
        messages += [{"role": t.role, "content": self._mark(t.content)} for t in turns]
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
            self._content(b, full[len(prev):], turn.role == "assistant", rendered=True)
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
