"""Checks of benchmarks/arena_decode.py: the `--smoke` run end to end (CPU), and the synthetic cache it times under
each eviction policy against the cache a real prefill leaves under that policy."""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "arena_decode.py"
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark modules import each other as siblings

import arena_decode  # noqa: E402
import e2e_models  # noqa: E402
import e2e_timing  # noqa: E402
from benchlib import gpu_slug  # noqa: E402


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("arena_decode")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "oracle: skipped" in proc.stdout and "random weights" in proc.stdout
    return json.loads((out / f"arena_decode-{gpu_slug()}.json").read_text())


def test_smoke_json_times_every_policy_against_learned(smoke_json: dict) -> None:
    machine, env = smoke_json["machine"], smoke_json["environment"]
    assert {"versions", "commit", "gpu", "command"} <= set(machine) and "--smoke" in machine["command"]
    assert env["plan"]["mode"] == "smoke" and env["arch"] == "gdn_lte" and not env["compiled"]
    assert "random weights" in smoke_json["note"] and "oracle" in smoke_json["skipped_policies"]
    timed = [p for p in arena_decode.POLICIES if p != "oracle"]
    assert env["policies"] == timed
    rows = smoke_json["decode"]
    points = {(r["batch"], r["context"]) for r in rows}
    assert points == {(1, 64), (2, 64)}
    for point in points:
        mine = {r["policy"]: r for r in rows if (r["batch"], r["context"]) == point}
        assert sorted(mine) == sorted(timed)
        for row in mine.values():
            assert row["status"] == "ok" and row["mode"] == "eager", row  # no CUDA graphs on the CPU
            assert row["ms_per_step"] > 0 and row["ratio_to_learned"] > 0 and row["tokens_per_s"] > 0
            assert row["rounds"] == len(row["round_ms"]) == 2 and row["step_bytes_per_seq"] > 0
            assert row["roofline_fraction"] is None  # no roofline on the CPU
        assert mine["learned"]["ratio_to_learned"] == 1.0
        # window's buffer holds only the sinks: the step fetches no K/V of the other buffer slots
        assert mine["window"]["buffer_kept"] < mine["learned"]["buffer_kept"]
        assert mine["window"]["step_bytes_per_seq"] < mine["learned"]["step_bytes_per_seq"]
        assert mine["window"]["cache_bytes_per_seq"] == mine["learned"]["cache_bytes_per_seq"]


def _lte_counts(model, cache) -> list[tuple[list, list]]:
    """Per LTE layer: valid slots per (row, kv head) and buffer lengths."""
    return [
        (state.valid.sum(-1).tolist(), state.buffer_len.tolist())
        for block, state in zip(model.model.layers, cache.states)
        if block.kind == "lte"
    ]


@pytest.mark.parametrize("policy", [p for p in arena_decode.POLICIES if p != "oracle"])
def test_synthetic_cache_keeps_the_slots_a_real_prefill_keeps(policy: str) -> None:
    """Decode attention fetches only valid slots, so the synthetic cache must leave as many valid as a prefill of the
    same context under the policy does (full buffer; only the sinks under `window`), also after decode steps."""
    plan = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    torch.manual_seed(0)
    model = e2e_models.build_model("gdn_lte", plan)
    model.set_eviction(policy)
    context = 64  # past the ring (9) and the buffer (6) of the tiny config
    with torch.no_grad():
        real = model.allocate_cache(2)
        model(torch.randint(0, model.config.vocab_size, (2, context)), cache=real, logits_to_keep=1)
        fake = e2e_models.synthetic_cache(model, 2, context, headroom=0)
        assert _lte_counts(model, fake) == _lte_counts(model, real)
        token = torch.zeros(2, 1, dtype=torch.long)
        for _ in range(12):  # past the window: tokens leave the ring and compete for the buffer
            for cache in (real, fake):
                e2e_timing.decode_step(model, token, cache)
        assert _lte_counts(model, fake) == _lte_counts(model, real)


def test_step_bytes_leave_out_the_empty_buffer_under_window() -> None:
    plan = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    model = e2e_models.build_model("gdn_lte", plan, device="meta")
    per_policy = {}
    for policy in ("learned", "window"):
        model.set_eviction(policy)
        cache = e2e_models.synthetic_cache(model, 1, 64, headroom=0)
        per_policy[policy] = e2e_models.step_bytes_per_seq(model, cache, 64, 1)
    ltes = [block.attn for block in model.model.layers if block.kind == "lte"]
    empty = sum((a.buffer_size - a.sink_size) * a.num_kv_heads * 2 * a.head_dim * 4 for a in ltes)  # fp32
    assert per_policy["learned"] - per_policy["window"] == empty > 0


def test_graph_step_holds_what_its_replays_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA graph records the addresses of the token and the cache it reads, not references to them: the step that
    `prepare_step` returns must hold them. arena_decode.py keeps only the steps while it prepares every policy, then
    replays them; a token freed with its `prepare_policy` call has its memory reused by later allocations, and the
    replays embed whatever lies there (on the GPU, a device-side assert in the embedding's index_select). Checked on
    the CPU with a stand-in for the CUDA graph API that counts replays."""

    class Graph:
        replays = 0

        def replay(self) -> None:
            Graph.replays += 1

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    plan = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    model = e2e_models.build_model("gdn_lte", plan)
    with torch.no_grad():
        cache = e2e_models.synthetic_cache(model, 1, 64)
        token = torch.zeros(1, 1, dtype=torch.long)
        step, _ = e2e_timing.prepare_step(model, cache, token, plan, graph=True, compiled=False)
    inputs = [weakref.ref(token), weakref.ref(cache)]
    del token, cache
    gc.collect()
    assert all(ref() is not None for ref in inputs)
    step()
    assert Graph.replays == 2  # the replay that uploads the graph, then this one


@pytest.mark.parametrize(("text", "message"), [("oracle", "is not timed"), ("lru", "unknown 'lru'")])
def test_bad_policies_are_refused(text: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        arena_decode.parse_policies(text)
    assert arena_decode.parse_policies("tova,learned,tova") == ("learned", "tova")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", [p for p in arena_decode.POLICIES if p != "oracle"])
def test_replayed_step_matches_the_eager_step_on_cuda(policy: str) -> None:
    """The step arena_decode.py times under each policy (captured once in a CUDA graph, no compile) advances a tiny
    GDN+LTE bf16 cache as the eager step does: the same buffer lengths, valid slots and positions, close logits."""
    smoke = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    plan = replace(smoke, device="cuda", dtype=torch.bfloat16, compile=False)
    model = e2e_models.build_model("gdn_lte", plan)
    model.set_eviction(policy)
    torch.manual_seed(0)
    with torch.no_grad():
        cache = e2e_models.synthetic_cache(model, 8, 100)
        eager = copy.deepcopy(cache)
        token = torch.randint(0, model.config.vocab_size, (8, 1), device="cuda")
        step, seen = e2e_timing.prepare_step(model, cache, token, plan, graph=True, compiled=False)
        for _ in range(12):  # past the window (8 + 1): tokens leave the ring and compete for the buffer
            step()
        e2e_timing.set_seen(cache, seen + 12)
        while eager.seen < cache.seen:
            e2e_timing.decode_step(model, token, eager)
        got = e2e_timing.decode_step(model, token, cache).float()
        want = e2e_timing.decode_step(model, token, eager).float()
    assert (got - want).norm() <= 0.03 * want.norm()
    for graphed, reference in zip(cache.states, eager.states):
        if hasattr(reference, "buffer_len"):  # LTE
            assert torch.equal(graphed.buffer_len, reference.buffer_len)
            assert torch.equal(graphed.valid, reference.valid)
            assert int(graphed.position) == int(reference.position) == cache.seen


@pytest.mark.parametrize("option", ["--batches", "--contexts"])
def test_bad_batches_and_contexts_are_refused(option: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", option, "1,0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and f"{option}: expected comma-separated positive integers" in proc.stderr
    assert not list(tmp_path.iterdir())
