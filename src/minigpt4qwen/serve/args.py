"""Command-line options of `webui` and `serve`, kept free of gradio/fastapi imports so `minigpt4qwen --help` and
`train` start without them (the GPU machine's image, for one, has neither)."""

from __future__ import annotations

import argparse

from ..data.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_REQUEST_PIXELS
from .quantize import QUANTIZE_MODES

# defaults of the API server's limits, shared by its options (api.ServeOptions) and its command line
MAX_TEXT_CHARS = 256 * 1024
MAX_DECODE_PIXELS = 2 * MAX_IMAGE_PIXELS
BODY_TIMEOUT_S = 60.0
HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
LIMIT_CONCURRENCY = 128
PREFILL_CHUNK = 2048
"""Default prompt tokens per prefill pass: 64 requests arriving together take ~3 passes, not ~11 (H200, 7B: 3,473
against 2,927 tokens/s at 64 clients; README "Serving")."""

SWITCH_INTERVAL_MS = 0.5
"""Default thread switch interval of the serving process (Python's own is 5 ms): the decoding thread gives up the
interpreter lock at every CUDA call and may wait that long to get it back while the HTTP side streams."""


def add_compile_decode_arg(p: argparse.ArgumentParser) -> None:
    """`--compile-decode`, shared by chat, webui and serve."""
    p.add_argument("--compile-decode", action="store_true",
                   help="CUDA greedy decoding: torch.compile the decode step (H100, 7B, batch 1: 122 -> 133 tokens/s; "
                        "the first answer of each batch size waits for the compile, ~1 min)")


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    """`--quantize`, shared by chat, predict, webui, serve and eval (applied once, in `Assistant.from_args`)."""
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                   help="weight-only quantization (torchao) of the LLM's decoder layers: int8 (CPU or CUDA), fp8 "
                        "(CUDA, compute capability >= 8.9), int4 (CUDA >= 8.0); the vision tower's layers in int8 "
                        "(fp8 with fp8) and an untied token embedding in int8 rows. Less weight memory; decoding is "
                        "faster only when compiled (--compile-decode) (default: none)")


def add_common_serve_args(p: argparse.ArgumentParser, port: int) -> None:
    """Options the web UI and the API share."""
    p.add_argument("--checkpoint", required=True, help="run directory (or one of its checkpoint directories)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_compile_decode_arg(p)
    add_quantize_arg(p)
    p.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, help="largest upload accepted")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="largest decoded image (width x height) accepted")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_common_serve_args(p, 8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host other than loopback without --api-key (anyone who reaches it can use it)")
    p.add_argument("--model-name", default="minigpt4qwen", help="the model id clients send")
    p.add_argument("--allow-remote-images", dest="allowed_hosts", action="append", default=[], metavar="HOST",
                   help="fetch http(s) image URLs from HOST (repeat; '*' for any); default: data: URLs only")
    p.add_argument("--max-batch", type=int, default=8,
                   help="most answers decoded together (continuous: KV-cache slots; static: rows of one batch)")
    p.add_argument("--batching", choices=("continuous", "static"), default=None,
                   help="continuous (default): requests join and leave the running batch at every decode step "
                        "(static KV cache of --max-batch slots, CUDA graphs on CUDA); static: a batch runs to its "
                        "end through HF generate (the default with --compile-decode alone; --batching continuous "
                        "--compile-decode compiles the continuous decoder)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                   help="continuous: prompt tokens prefilled between two decode steps (longer prompts are split)")
    p.add_argument("--graph-vision", action="store_true",
                   help="continuous, CUDA: admissions run the vision tower + Q-Former as CUDA graphs captured at start "
                        "(one per power-of-two image count up to --max-batch; not yet measured on a GPU)")
    p.add_argument("--switch-interval-ms", type=float, default=SWITCH_INTERVAL_MS,
                   help="the interpreter's thread switch interval: how long the HTTP side may hold the lock the "
                        "decoding thread needs next (Python's default: 5)")
    p.add_argument("--slot-len", type=int, default=0,
                   help="continuous: positions (prompt + answer) per slot (0: prompt budget + --max-tokens-limit, "
                        "less if the KV cache would not fit the GPU)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    g = p.add_argument_group("limits", "what one request, and all together, may cost (see README: Limits)")
    g.add_argument("--max-images", type=int, default=MAX_IMAGES, help="images per request")
    g.add_argument("--max-request-pixels", type=int, default=MAX_REQUEST_PIXELS,
                   help="pixels of a request's images together, as their headers declare them")
    g.add_argument("--max-decode-pixels", type=int, default=MAX_DECODE_PIXELS,
                   help="image pixels decoded at once over all requests (others wait)")
    g.add_argument("--max-text-chars", type=int, default=MAX_TEXT_CHARS, help="characters of text per request")
    g.add_argument("--max-request-bytes", type=int, default=None,
                   help="request body (default: the largest images in base64 + 8 bytes per text character + 1 MiB)")
    g.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S, help="seconds to receive a request body (then 408)")
    g.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                   help="seconds for a request's headers to arrive, from connect or the previous response")
    g.add_argument("--keep-alive-timeout", type=int, default=KEEP_ALIVE_S, help="seconds an idle kept-alive connection stays")
    g.add_argument("--limit-concurrency", type=int, default=LIMIT_CONCURRENCY,
                   help="connections + requests in progress before new requests get 503 (0: no limit)")


def add_webui_args(p: argparse.ArgumentParser) -> None:
    add_common_serve_args(p, 7860)
