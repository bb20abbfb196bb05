"""Terminal chat with streaming answers and the seed's commands.

    minigpt4qwen chat --checkpoint RUN_DIR --image cat.jpg
    minigpt4qwen chat --checkpoint RUN_DIR --image cat.jpg --query "What is in the image?"   # one-shot

The conversation (prompt, history, images, settings) is `session.ChatSession`, as in the web UI.
"""

from __future__ import annotations

import os
import sys

from ..data.images import ImageError, load_image
from .generate import Assistant, GenerationSettings
from .session import ChatSession

HELP = """commands:
  :help        show this help
  :clear       clear the screen
  :clh         clear the history (keep the images)
  :his         show the history
  :img [PATHS] show the image paths, or replace them (space-separated) and clear the history
  :q           quit"""


def add_generation_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam search")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def settings_from_args(args) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def run_chat(args) -> int:
    images = list(args.image or [])
    for path in images:
        load_image(path)  # fail now, with the file name, not after the model has loaded
    assistant = Assistant.from_args(args)
    session = ChatSession(assistant, images, settings_from_args(args))
    if args.query is not None:
        for piece in session.ask(args.query):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    print(HELP)
    print(f"images: {images or 'none'}")
    while True:
        try:
            line = input("\nuser> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line == ":q":
            return 0
        if line == ":help":
            print(HELP)
        elif line == ":clear":
            os.system("cls" if os.name == "nt" else "clear")
        elif line == ":clh":
            session.history = []
            print("history cleared")
        elif line == ":his":
            for t in session.history:
                print(f"{t.role}: {t.content}")
        elif line.startswith(":img"):
            paths = line.split()[1:]
            if paths:
                try:
                    for p in paths:
                        load_image(p)
                except ImageError as exc:
                    print(f"error: {exc}")
                    continue
                session.images, session.history = paths, []
            print(f"images: {session.images or 'none'}")
        else:
            sys.stdout.write("assistant> ")
            try:
                for piece in session.ask(line):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except ValueError as exc:
                print(f"\nerror: {exc}")
            print()
