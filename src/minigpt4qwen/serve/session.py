"""One conversation as `chat`, `webui` and `serve` hold it: the turn history, the images it is about, its generation
settings, and the checks a request's turns and images pass before they reach the model.

The three front ends build their prompts here, so the same question about the same image gives the same prompt (the
seed's: image prompt(s) first, then the question) and the same answer in the terminal, the browser and over HTTP.
Typed text passes `literal` on its way in: only the front end's own image prompts ask for images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..data.conversation import IMAGE_MARKER, IMAGE_PROMPT, Turn, literal
from ..data.images import ImageLimits
from .generate import Assistant, GenerationSettings


class ConversationError(ValueError):
    """A conversation the model cannot answer as sent (the client's to fix)."""


def first_turn(query: str, n_images: int) -> str:
    """The seed's prompt: the image prompt(s) first, then the question."""
    return " ".join([IMAGE_PROMPT] * n_images + [query]) if n_images else query


def turn_content(pieces: Iterable[str]) -> str:
    """A message's text and image prompts in their order, as one turn (an image then a question: `first_turn`)."""
    return " ".join(p for p in pieces if p)


def check_conversation(turns: list[Turn], n_images: int, limits: ImageLimits) -> None:
    """A request is answerable: it ends with a user turn, carries no more images than the limits allow and has one
    image marker per image (checked here so that a bad request fails alone, never inside a batch of others)."""
    if not turns or turns[-1].role != "user":
        raise ConversationError("the last message must come from the user")
    limits.check_count(n_images)
    markers = sum(t.content.count(IMAGE_MARKER) for t in turns)
    if markers != n_images:
        raise ConversationError(f"the conversation has {markers} image marker(s) for {n_images} image(s)")


class ChatSession:
    """History + images of one conversation; `ask` streams the answer and records it."""

    def __init__(self, assistant: Assistant, images: list[str], settings: GenerationSettings) -> None:
        self.assistant = assistant
        self.settings = settings
        self.images = images
        self.history: list[Turn] = []

    def turns_for(self, query: str) -> list[Turn]:
        query = literal(query)
        content = first_turn(query, len(self.images)) if not self.history else query
        # answers are kept as shown; an <ImageHere> the model wrote is text when the next prompt is built
        history = [Turn(t.role, literal(t.content)) if t.role == "assistant" else t for t in self.history]
        return [*history, Turn("user", content)]

    def ask(self, query: str) -> Iterator[str]:
        turns = self.turns_for(query)
        answer = ""
        if self.settings.num_beams > 1:  # beam search has no token stream
            answer = self.assistant.generate([turns], [self.images], self.settings)[0]
            yield answer
        else:
            for piece in self.assistant.stream(turns, self.images, self.settings):
                answer += piece
                yield piece
        self.history = [*self.history, turns[-1], Turn("assistant", answer.strip())]
