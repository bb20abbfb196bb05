"""The OpenAI-compatible API through a real uvicorn server on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import load_test, png_data_url, running_server

from minigpt4qwen.data.conversation import IMAGE_PROMPT, Turn
from minigpt4qwen.data.images import ImageLimits
from minigpt4qwen.serve.api import ServeOptions, build_app
from minigpt4qwen.serve.generate import Assistant, GenerationSettings
from minigpt4qwen.serve.session import first_turn, turn_content

openai = pytest.importorskip("openai")

KEY = "test-secret"
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def image_path(shapes_data) -> Path:
    return sorted((shapes_data / "images").glob("*.png"))[0]


@pytest.fixture(scope="module")
def server(assistant, shapes_data):
    options = ServeOptions(api_key=KEY, limits=ImageLimits(max_bytes=64 * 1024, max_pixels=128 * 128), max_batch=32,
                           allowed_hosts=["127.0.0.1"])
    app = build_app(assistant, options)
    with running_server(app) as url:
        yield url, app.state.service


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def messages(image_url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": question}]}]


def direct(assistant: Assistant, image_path: Path, settings: GenerationSettings) -> str:
    """What the shared generation path answers for the same prompt as `minigpt4qwen chat`."""
    return assistant.generate([[Turn("user", first_turn(QUESTION, 1))]], [[str(image_path)]], settings)[0]


def test_image_then_question_is_the_chat_prompt():
    assert turn_content([IMAGE_PROMPT, QUESTION]) == first_turn(QUESTION, 1)
    assert turn_content([IMAGE_PROMPT, "", IMAGE_PROMPT, QUESTION]) == first_turn(QUESTION, 2)


def sampled(seed: int) -> GenerationSettings:
    """The API's settings for temperature=1, top_p=1 (OpenAI: no top-k)."""
    return GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=seed)


def test_models_and_auth(server):
    url, _ = server
    ok = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "minigpt4qwen"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="minigpt4qwen", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_answers_equal_the_shared_generation_path(client, assistant, image_path):
    url = png_data_url(Image.open(image_path))
    greedy = client.chat.completions.create(model="minigpt4qwen", messages=messages(url), max_tokens=8, temperature=0)
    assert greedy.choices[0].message.content == direct(assistant, image_path, GenerationSettings(max_new_tokens=8))
    out = client.chat.completions.create(model="minigpt4qwen", messages=messages(url), max_tokens=8, seed=7,
                                         temperature=1.0, top_p=1.0)
    answer = out.choices[0].message.content
    assert answer and answer == direct(assistant, image_path, sampled(7))
    prompt = assistant.template.encode([Turn("user", first_turn(QUESTION, 1))], assistant.max_txt_len, True)
    assert out.usage.prompt_tokens == len(prompt.input_ids)
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason in ("stop", "length") and out.object == "chat.completion"


def test_streaming_equals_non_streaming(server, client, image_path):
    url = png_data_url(Image.open(image_path))
    kw = dict(model="minigpt4qwen", messages=messages(url), max_tokens=8, seed=11, temperature=1.0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    raw = httpx.post(f"{server[0]}/v1/chat/completions", json={**kw, "stream": True},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[1][6:])["object"] == "chat.completion.chunk"


def test_n_and_stop(client, image_path):
    url = png_data_url(Image.open(image_path))
    kw = dict(model="minigpt4qwen", messages=messages(url), max_tokens=8, temperature=1.0, seed=3)
    answer = client.chat.completions.create(**kw).choices[0].message.content
    stop = next(ch for ch in answer if ch.isalnum() and answer.index(ch) > 0)  # cuts somewhere inside the answer
    cut = client.chat.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.message.content == answer[: answer.index(stop)].rstrip()
    assert cut.finish_reason == "stop"
    two = client.chat.completions.create(**kw, n=2)
    assert [c.index for c in two.choices] == [0, 1]


def test_errors_are_openai_style_and_the_server_keeps_serving(server, client, image_path):
    url, _ = server
    post = partial(httpx.post, f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    good = {"model": "minigpt4qwen", "messages": messages(png_data_url(Image.open(image_path))), "max_tokens": 2}

    def error(expected: int, **kw) -> dict:
        r = post(**kw)
        assert r.status_code == expected, r.text
        return r.json()["error"]

    assert error(400, content=b"{not json")["code"] == "invalid_json"
    assert error(404, json={**good, "model": "gpt-4"})["code"] == "model_not_found"
    assert error(400, json={**good, "max_tokens": 10**6})["code"] == "context_length_exceeded"
    long = [{"role": "user", "content": "word " * 3000}]
    assert error(400, json={**good, "messages": long})["code"] == "context_length_exceeded"
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    assert error(400, json={**good, "messages": messages(png_data_url(big))})["code"] == "image_too_large"
    for bad in ("data:image/png;base64,aGVsbG8=", "data:image/png;base64,@@@", "http://example.com/cat.png",
                str(image_path), f"file://{image_path}"):
        assert error(400, json={**good, "messages": messages(bad)})["type"] == "invalid_request_error"
    assert error(400, json={**good, "temperature": 5})["param"] == "temperature"
    assert error(400, json={**good, "messages": [{"role": "assistant", "content": "hi"}]})["param"] == "messages"
    assert post(json=good).status_code == 200


def test_remote_images_only_from_allowed_hosts(client, shapes_data, image_path, assistant):
    handler = partial(SimpleHTTPRequestHandler, directory=str(shapes_data / "images"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        remote = f"http://127.0.0.1:{httpd.server_address[1]}/{image_path.name}"
        out = client.chat.completions.create(model="minigpt4qwen", messages=messages(remote), max_tokens=8,
                                             temperature=0)
        assert out.choices[0].message.content == direct(assistant, image_path, GenerationSettings(max_new_tokens=8))
        with pytest.raises(openai.BadRequestError, match="not allowed"):
            client.chat.completions.create(model="minigpt4qwen", max_tokens=2,
                                           messages=messages(remote.replace("127.0.0.1", "localhost")))
        port = httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
    # an allowed host that does not answer: the client's URL is at fault (400), the server is not (500)
    with pytest.raises(openai.BadRequestError, match="failed"):
        client.chat.completions.create(model="minigpt4qwen", max_tokens=2,
                                       messages=messages(f"http://127.0.0.1:{port}/{image_path.name}"))


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_load_32_streaming_clients_batched(assistant, image_path, batching):
    options = ServeOptions(api_key=KEY, limits=ImageLimits(max_bytes=64 * 1024, max_pixels=128 * 128), max_batch=32,
                           batching=batching)
    app = build_app(assistant, options)
    with running_server(app) as url:
        stats = load_test(url, clients=32, requests=64, max_tokens=8, api_key=KEY,
                          image_url=png_data_url(Image.open(image_path)))
    batcher = app.state.service.batcher
    assert stats["failed"] == 0 and stats["ok"] == 64, stats["errors"]
    assert batcher.rows_run == 64 and batcher.most_rows > 1, "requests were not decoded together"
    if batching == "static":
        assert batcher.batches_run < 64 / 2, f"64 rows in {batcher.batches_run} batches: requests were not batched"


def test_subcommand_options():
    """The options `minigpt4qwen serve` / `webui` get; both bind 127.0.0.1 unless told otherwise."""
    import argparse

    from minigpt4qwen.serve import api
    from minigpt4qwen.serve.api import add_serve_args
    from minigpt4qwen.serve.webui import add_webui_args

    serve, webui = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_serve_args(serve)
    add_webui_args(webui)
    s = serve.parse_args(["--checkpoint", "run", "--api-key", "k", "--allow-remote-images", "img.example"])
    w = webui.parse_args(["--checkpoint", "run"])
    assert (s.host, s.port, s.api_key, s.allowed_hosts, s.max_batch) == ("127.0.0.1", 8000, "k", ["img.example"], 8)
    assert (api.batching_of(s), s.prefill_chunk) == ("continuous", 2048)  # the defaults the GPU bench chose
    options = api.options_from_args(s)
    assert (options.batching, options.prefill_chunk, options.switch_interval_ms) == ("continuous", 2048, 0.5)
    assert api.options_from_args(serve.parse_args(["--checkpoint", "run", "--switch-interval-ms", "5"])) \
        .switch_interval_ms == 5
    assert api.batching_of(serve.parse_args(["--checkpoint", "run", "--batching", "static"])) == "static"
    assert api.batching_of(serve.parse_args(["--checkpoint", "run", "--compile-decode"])) == "static"
    assert (w.host, w.port, w.device) == ("127.0.0.1", 7860, None) and w.max_image_pixels > 0


def test_sse_sends_queued_deltas_as_one_chunk():
    """A stream that fell behind sends the deltas already queued as one chunk (same text), keeping a Finish and
    the other answer's deltas apart."""
    import asyncio

    from minigpt4qwen.serve.api import _sse
    from minigpt4qwen.serve.batcher import Delta, Finish, Job

    async def run() -> list[dict]:
        events: asyncio.Queue = asyncio.Queue()
        for ev in [Delta(0, "Hel"), Delta(0, "lo"), Delta(1, "A"), Delta(1, "B"), Delta(0, " you"),
                   Finish(0, "stop", "Hello you", 3), Finish(1, "length", "AB", 2)]:
            events.put_nowait(ev)
        job = Job([], [], GenerationSettings(), lambda ev: None, n=2)
        chunks = [c async for c in _sse(job, events, {"id": "x"}, include_usage=True)]
        return [json.loads(c[6:]) for c in chunks if c != "data: [DONE]\n\n"]

    chunks = asyncio.run(run())
    content = [(c["choices"][0]["index"], c["choices"][0]["delta"].get("content")) for c in chunks
               if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert content == [(0, "Hello"), (1, "AB"), (0, " you")]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["stop", "length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_build_app_sets_the_thread_switch_interval(assistant):
    """The app owns its process: the interpreter's switch interval becomes the option's (None leaves it)."""
    import sys

    before = sys.getswitchinterval()
    try:
        build_app(assistant, ServeOptions(batching="static", switch_interval_ms=0.5))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        sys.setswitchinterval(0.004)
        build_app(assistant, ServeOptions(batching="static", switch_interval_ms=None))
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(before)


def test_mailbox_wakes_the_loop_once_for_events_posted_together():
    """Events posted from another thread while the loop is busy arrive all, in order, with one wake-up between
    them (not one system call per event); a post after the drain wakes the loop again."""
    import asyncio

    from minigpt4qwen.serve.api import Mailbox

    async def run() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        wakeups = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakeups.append(a) or original(*a)  # counts the wake-ups
        box, got = Mailbox(loop), []
        poster = threading.Thread(target=lambda: [box.post(got.append, i) for i in range(50)])
        poster.start()
        poster.join()  # the loop did not run meanwhile: one wake-up is pending for all 50
        assert len(wakeups) == 1
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        box.post(got.append, 50)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return got, len(wakeups)

    got, wakeups = asyncio.run(run())
    assert got == list(range(51)) and wakeups == 2
