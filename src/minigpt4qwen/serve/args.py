"""Command-line options of `webui` and `serve`, kept free of gradio/fastapi imports so `minigpt4qwen --help` and
`train` start without them (the GPU machine's image, for one, has neither)."""

from __future__ import annotations

import argparse

from ..data.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS


def add_compile_decode_arg(p: argparse.ArgumentParser) -> None:
    """`--compile-decode`, shared by chat, webui and serve."""
    p.add_argument("--compile-decode", action="store_true",
                   help="CUDA greedy decoding: torch.compile the decode step (H100, 7B, batch 1: 122 -> 133 tokens/s; "
                        "the first answer of each batch size waits for the compile, ~1 min)")


def add_common_serve_args(p: argparse.ArgumentParser, port: int) -> None:
    """Options the web UI and the API share."""
    p.add_argument("--checkpoint", required=True, help="run directory (or one of its checkpoint directories)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_compile_decode_arg(p)
    p.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, help="largest upload accepted")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="largest decoded image (width x height) accepted")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_common_serve_args(p, 8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--model-name", default="minigpt4qwen", help="the model id clients send")
    p.add_argument("--allow-remote-images", dest="allowed_hosts", action="append", default=[], metavar="HOST",
                   help="fetch http(s) image URLs from HOST (repeat; '*' for any); default: data: URLs only")
    p.add_argument("--max-batch", type=int, default=8, help="most answers decoded together in one batch")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")


def add_webui_args(p: argparse.ArgumentParser) -> None:
    add_common_serve_args(p, 7860)
