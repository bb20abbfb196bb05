"""Gradio web UI: upload images, chat about them with streamed answers, tune sampling or beam search.

    minigpt4qwen webui --checkpoint RUN_DIR [--host 127.0.0.1 --port 7860]

The chat logic is `session.ChatSession` (the seed's image prompt placement, beam search without a token stream),
the terminal chat's too, and the API builds its prompts in the same module, so all three answer alike. Offline by
design: no analytics, no share link, fonts served locally, binds 127.0.0.1 unless told otherwise; uploads are
limited in bytes and decoded pixels (`data.images.ImageLimits`, the API's limits).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

from ..data.conversation import Turn
from ..data.images import ImageError, ImageLimits, open_image
from .args import add_webui_args as add_webui_args  # re-exported: the command's options live in args.py
from .generate import Assistant, GenerationSettings
from .session import ChatSession

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

TITLE = "MiniGPT4Qwen"


def settings_from_controls(do_sample: bool, temperature: float, top_p: float, top_k: float, num_beams: float,
                           max_new_tokens: float, repetition_penalty: float, seed: float | None) -> GenerationSettings:
    """Slider values arrive as floats; seed < 0 (or empty) means a fresh random draw each time."""
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), temperature=float(temperature),
        top_p=float(top_p), top_k=int(top_k), num_beams=int(num_beams), repetition_penalty=float(repetition_penalty),
        seed=None if seed is None or seed < 0 else int(seed),
    )


def check_uploads(files: list[str] | None, limits: ImageLimits) -> list[str]:
    """Paths of uploaded images after the byte/format/pixel checks (the same checks as the API)."""
    paths = [str(f) for f in files or []]
    for path in paths:
        open_image(Path(path).read_bytes(), limits)
    return paths


def chat_turn(assistant: Assistant, query: str, chat: list[dict], history: list[dict], images: list[str],
              settings: GenerationSettings) -> Iterator[tuple[list[dict], list[dict], bool]]:
    """(shown messages, stored history, finished) after each streamed piece; the history changes only at the end.

    The history is stored as plain dicts because Gradio deep-copies session state (it must never hold the model).
    """
    if not query:
        yield chat, history, True
        return
    session = ChatSession(assistant, list(images or []), settings)
    session.history = [Turn(**t) for t in history]
    shown = [*chat, {"role": "user", "content": query}, {"role": "assistant", "content": ""}]
    for piece in session.ask(query):
        shown[-1]["content"] += piece
        yield shown, history, False
    shown[-1]["content"] = session.history[-1].content
    yield shown, [{"role": t.role, "content": t.content} for t in session.history], True


def build_app(assistant: Assistant, defaults: GenerationSettings | None = None, limits: ImageLimits | None = None):
    """The Gradio Blocks app; per-browser state is plain data (history dicts, image paths), never the model."""
    import gradio as gr

    d = defaults or GenerationSettings()
    limits = limits or ImageLimits()

    def upload(files):
        try:
            paths = check_uploads(files, limits)
        except ImageError as exc:
            raise gr.Error(str(exc)) from None
        return paths, paths or None, [], []  # new images start a new conversation, as `:img` does in the CLI

    def respond(query: str, chat: list, history: list, images: list, *controls) -> Iterator[tuple]:
        """The input stays locked until the history is stored, so that the next question sees this answer."""
        query = (query or "").strip()
        try:
            for shown, stored, done in chat_turn(assistant, query, chat, history, images,
                                                 settings_from_controls(*controls)):
                yield shown, gr.update(value="", interactive=done), stored, gr.update(interactive=done)
        except ValueError as exc:  # over-long prompt, image count mismatch: keep the page usable
            gr.Warning(str(exc))
            yield chat, gr.update(value=query, interactive=True), history, gr.update(interactive=True)

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nUpload one or several images, then ask about them.")
        images = gr.State([])
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="images")
                gallery = gr.Gallery(label="Current images", height=200, columns=3, interactive=False,
                                     object_fit="contain", elem_id="gallery")
                with gr.Accordion("Generation", open=False):
                    controls = [
                        gr.Checkbox(d.do_sample, label="do_sample (off: greedy or beam search)"),
                        gr.Slider(0.05, 2.0, d.temperature, step=0.05, label="temperature"),
                        gr.Slider(0.05, 1.0, d.top_p, step=0.05, label="top_p"),
                        gr.Slider(0, 200, d.top_k, step=1, label="top_k (0: off)"),
                        gr.Slider(1, 8, d.num_beams, step=1, label="num_beams (> 1: beam search, no streaming)"),
                        gr.Slider(1, 1024, d.max_new_tokens, step=1, label="max_new_tokens"),
                        gr.Slider(1.0, 2.0, d.repetition_penalty, step=0.05, label="repetition_penalty"),
                        gr.Number(-1 if d.seed is None else d.seed, precision=0, label="seed (-1: random)"),
                    ]
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat")
                query = gr.Textbox(placeholder="Ask about the images and press Enter", show_label=False,
                                   elem_id="query")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear_history = gr.Button("Clear history", elem_id="clear-history")
                    clear_all = gr.Button("Clear all", elem_id="clear-all")

        files.upload(upload, files, [images, gallery, chatbot, history])
        files.clear(lambda: ([], None, [], []), None, [images, gallery, chatbot, history])
        chatbot.clear(lambda: [], None, history)  # the chat box's own trash button
        inputs = [query, chatbot, history, images, *controls]
        for trigger in (send.click, query.submit):
            trigger(respond, inputs, [chatbot, query, history, send], concurrency_id="chat")
        clear_history.click(lambda: ([], []), None, [chatbot, history])
        clear_all.click(lambda: ([], [], [], None, None), None, [chatbot, history, images, files, gallery])
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = 7860, limits: ImageLimits | None = None,
           block: bool = True):
    """Start the server offline: no share tunnel, no monitoring, no server-side rendering (would need node)."""
    limits = limits or ImageLimits()
    return app.queue().launch(
        server_name=host, server_port=port, share=False, max_file_size=limits.max_bytes, prevent_thread_lock=not block,
        show_error=True, enable_monitoring=False, ssr_mode=False, pwa=False, mcp_server=False, quiet=not block,
        footer_links=[],
    )


def run_webui(args: argparse.Namespace) -> int:
    assistant = Assistant.from_args(args)
    limits = ImageLimits(args.max_image_bytes, args.max_image_pixels)
    launch(build_app(assistant, limits=limits), args.host, args.port, limits)
    return 0
