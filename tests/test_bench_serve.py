"""`minigpt4qwen bench serve` on tiny presets (CPU): both batching modes behind the real HTTP server report complete,
consistent records (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from minigpt4qwen import bench

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def test_bench_serve_reports_both_modes_per_level(tmp_path):
    out = tmp_path / "serve.jsonl"
    argv = ["serve", "--device", "cpu", "--serve-clients", "1,4", "--serve-tokens", "8", "--serve-requests", "2",
            "--out", str(out)]
    assert bench.main(argv) == 0
    recs = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    for mode in ("static", "continuous"):
        assert recs[f"serve-{mode}-warmup"]["ok"] == 4  # the warm-up runs the highest level once
        for clients in (1, 4):
            r = recs[f"serve-{mode}-c{clients}"]
            assert r["mode"] == mode and r["clients"] == clients and r["max_tokens"] == 8
            assert r["ok"] == r["requests"] == 2 * clients and r["failed"] == 0, r["errors"]
            assert len(r["tokens_per_request"]) == r["ok"] and sum(r["tokens_per_request"]) == r["output_tokens"]
            assert all(0 <= t <= 8 for t in r["tokens_per_request"])
            # every request ran to max_tokens unless the model ended its turn first
            assert sum(t == 8 for t in r["tokens_per_request"]) == r["ok"] - r["stopped_early"]
            assert r["tokens_per_s"] == pytest.approx(r["output_tokens"] / r["wall_s"], rel=1e-3)
            for key in ("ttft_p50_s", "ttft_p95_s", "itl_p95_s", "wall_s", "peak_mem_gib"):
                assert key in r
            assert r["ttft_p50_s"] is not None and r["itl_p95_s"] is not None  # every request streamed text
            assert r["ttft_p50_s"] <= r["ttft_p95_s"]
            if mode == "continuous":  # the scheduler's time by phase during this level, and its decode steps
                spent = r["scheduler_s"]
                assert set(spent) == {"admit", "prefill", "launch", "wait", "stream", "sampled"}
                assert spent["admit"] > 0 and spent["prefill"] > 0 and spent["launch"] > 0 and spent["sampled"] == 0
                assert sum(spent.values()) <= r["wall_s"]  # one thread's time within the level's wall time
                # greedy requests of up to 8 tokens: a few steps per request, never more than requests x 8
                assert r["ok"] <= r["decode_steps"] <= 8 * r["ok"]
            else:
                assert "scheduler_s" not in r
    assert not any("error" in r for r in recs.values())


def test_serve_set_overrides_typed_server_options():
    from minigpt4qwen.bench.serve import option_overrides

    assert option_overrides(["prefill_chunk=512", "switch_interval_ms=5", "slot_len=640"]) == \
        {"prefill_chunk": 512, "switch_interval_ms": 5.0, "slot_len": 640}
    assert option_overrides(["graph_vision=true"]) == {"graph_vision": True}
    for bad in ("nope=1", "prefill_chunk", "limits=1", "graph_vision=yes please"):
        with pytest.raises(ValueError, match="--serve-set"):
            option_overrides([bad])
