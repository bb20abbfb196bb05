"""Screenshot of the web UI answering questions about an image, for the README (docs/webui.png).

    python scripts/webui_screenshot.py --checkpoint demo_runs/demo/run \
        --image demo_runs/demo/data/images/heldout_0000.png --ask "What color is the shape?" --ask "How many?" \
        --out docs/webui.png

Serves the run with the regular web UI (greedy answers), drives it in headless Chromium (Debian's, as the
browser test does: scripts/install_browser.sh), waits until every answer has arrived, and prints the answers next
to what `chat --query` gives for the same questions, so the picture shows what the model really answers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from minigpt4qwen.serve.generate import Assistant, GenerationSettings
from minigpt4qwen.serve.webui import build_app, launch

ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--ask", action="append", required=True, help="a question (repeat for several turns)")
    p.add_argument("--out", default="docs/webui.png")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    exe = next((x for x in (os.environ.get("CHROMIUM_PATH"), shutil.which("chromium-headless-shell"),
                            shutil.which("chromium")) if x), None)
    if exe is None:
        raise SystemExit("no Chromium: run scripts/install_browser.sh")
    assistant = Assistant.from_run(args.checkpoint, device="cpu")
    settings = GenerationSettings(max_new_tokens=16)
    app = build_app(assistant, defaults=settings)
    _, url, _ = launch(app, port=None, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.locator("#images input[type=file]").set_input_files(args.image)
            page.locator("#gallery img").first.wait_for(timeout=30_000)
            page.wait_for_function(  # decoded, not just in the DOM: the picture must show in the screenshot
                "() => [...document.querySelectorAll('#gallery img')].some(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000)
            for n, question in enumerate(args.ask, 1):
                page.locator("#query textarea").fill(question)
                page.locator("#send").click()
                page.wait_for_function(  # the box unlocks once the answer is complete
                    "n => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === n"
                    " && !document.querySelector('#query textarea').disabled", arg=n, timeout=60_000)
            answers = page.locator('#chat [data-testid="bot"]').all_inner_texts()
            # presentation only: the whole picture (the gallery crops thumbnails to fill) and the whole conversation
            page.add_style_tag(content="#gallery, #gallery > div { height: 460px !important; max-height: none !important; } "
                                       "#chat, #chat > div { height: auto !important; max-height: none !important; }")
            page.wait_for_timeout(500)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.close()
    for q, a in zip(args.ask, answers):
        print(f"{q} -> {a.strip()}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
