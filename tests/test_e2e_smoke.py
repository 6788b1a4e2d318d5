"""Checks of benchmarks/e2e.py: the `--smoke` run end to end and the synthetic decode caches against real ones (CPU),
and on a GPU the step it times against the eager step."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "e2e.py"
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark modules import each other as siblings

import e2e  # noqa: E402
import e2e_models  # noqa: E402
import e2e_timing  # noqa: E402
from benchlib import error_text, gpu_slug  # noqa: E402
from hlsa.cache import HybridCache  # noqa: E402


def _results(out: Path) -> Path:
    return out / f"e2e-{gpu_slug()}.json"


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("e2e")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(_results(out).read_text())


def test_smoke_json_has_every_section(smoke_json: dict) -> None:
    env, machine = smoke_json["environment"], smoke_json["machine"]
    assert {"versions", "commit", "gpu", "command"} <= set(machine) and {"dtype", "plan"} <= set(env)
    assert machine["versions"]["torch"] and "--smoke" in machine["command"] and env["plan"]["mode"] == "smoke"
    assert smoke_json["copy_bandwidth_bytes_per_s"] > 0
    assert set(smoke_json["models"]) == {"gdn", "gdn_swa", "gdn_attn", "gdn_lte", "gdn_nsa", "transformer", "nsa"}
    for info in smoke_json["models"].values():
        assert info["weight_bytes"] > 0 and info["parameters"] > 0
    decode_keys = {"latency_ms", "tokens_per_s", "cache_bytes_per_seq", "step_bytes_per_seq", "roofline_fraction"}
    for row in smoke_json["decode"]:
        assert row["status"] == "ok", row
        assert decode_keys <= set(row) and row["mode"] == "eager"  # no CUDA graphs on the CPU
        assert row["projections"] == "auto"
        assert 0 < row["roofline_fraction"] and row["tokens_per_s"] > 0
    assert {(r["arch"], r["context"]) for r in smoke_json["decode"] if r["arch"] == "gdn_lte"} >= {("gdn_lte", 128)}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in smoke_json["prefill"])
    assert len(smoke_json["prefill"]) == 7 * 2
    verdicts = {t["verdict"] for t in smoke_json["targets"]}
    assert verdicts <= {"PASS", "MISS", "NOT MEASURED"} and len(smoke_json["targets"]) >= 5


def test_memory_table_growth(smoke_json: dict) -> None:
    """Full attention's cache grows linearly with the context; GDN+LTE's is constant."""
    by = {(r["arch"], r["context"]): r["cache_bytes_per_seq"] for r in smoke_json["memory"]}
    step = by[("transformer", 512)] - by[("transformer", 256)]
    assert step > 0 and by[("transformer", 1024)] - by[("transformer", 512)] == 2 * step
    assert by[("gdn_lte", 1024)] == by[("gdn_lte", 256)]


def test_memory_table_gives_each_measured_points_roofline(smoke_json: dict) -> None:
    """The meta-device shapes (memory table) give the roofline that each decode point computed from its real model and
    cache, so target 2's bound on the Transformer, which is computed from the shapes alone, uses the same arithmetic."""
    shapes = {(r["arch"], r["context"]): r for r in smoke_json["memory"]}
    bandwidth = smoke_json["copy_bandwidth_bytes_per_s"]
    for row in smoke_json["decode"]:
        shape = shapes[(row["arch"], row["context"])]
        assert shape["weight_bytes"] == smoke_json["models"][row["arch"]]["weight_bytes"]
        assert shape["step_bytes_per_seq"] == row["step_bytes_per_seq"], row
        best = e2e_models.roofline_tokens_per_s(
            shape["weight_bytes"], shape["step_bytes_per_seq"], row["batch"], bandwidth
        )
        assert best == pytest.approx(row["roofline_tokens_per_s"], rel=1e-12)
    (bound,) = [t for t in smoke_json["targets"] if "the transformer's roofline" in t["target"]]
    lte = [r for r in smoke_json["decode"] if (r["arch"], r["batch"], r["context"]) == ("gdn_lte", 2, 64)]
    base = [r for r in smoke_json["decode"] if (r["arch"], r["batch"], r["context"]) == ("transformer", 2, 64)]
    assert bound["value"] == pytest.approx(lte[0]["tokens_per_s"] / base[0]["roofline_tokens_per_s"])


def _shapes(cache) -> list[dict]:
    return [
        {name: (tuple(v.shape), v.dtype) for name, v in vars(state).items() if isinstance(v, torch.Tensor)}
        for state in cache.states
    ]


@pytest.mark.parametrize("arch", ["gdn_swa", "gdn_lte", "gdn_nsa", "transformer"])
def test_synthetic_cache_matches_a_real_prefill(arch: str) -> None:
    """Same tensors (shapes, dtypes), same counters and the same valid slots as a real prefill of C tokens."""
    plan = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    torch.manual_seed(0)
    model = e2e_models.build_model(arch, plan)
    context = 512  # a multiple of the full-attention allocation unit, so that both hold exactly C slots
    with torch.no_grad():
        real = model.allocate_cache(1)
        model(torch.randint(0, model.config.vocab_size, (1, context)), cache=real, logits_to_keep=1)
        fake = e2e_models.synthetic_cache(model, 1, context, headroom=0)
        assert _shapes(fake) == _shapes(real)
        assert fake.seen == real.seen == context
        for block, f, r in zip(model.model.layers, fake.states, real.states):
            assert f.seen == r.seen
            if hasattr(r, "position"):
                assert int(f.position) == int(r.position) == context
            if block.kind in ("swa", "attn"):
                assert torch.equal(f.valid, r.valid)
            if block.kind == "lte":  # the ring holds the same positions; the buffer is full in the synthetic one
                ring = block.attn.window_size + 1
                assert torch.equal(f.token_pos[..., :ring], r.token_pos[..., :ring])
                assert bool(f.valid.all()) and int(f.buffer_len.min()) == block.attn.buffer_size


@pytest.mark.parametrize("arch", ["gdn_lte", "gdn_nsa", "transformer"])
def test_decode_on_synthetic_cache_advances(arch: str) -> None:
    plan = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    model = e2e_models.build_model(arch, plan)
    with torch.no_grad():
        cache = e2e_models.synthetic_cache(model, 2, 100)
        logits = model(torch.zeros(2, 1, dtype=torch.long), cache=cache).logits
    assert logits.shape == (2, 1, model.config.vocab_size) and bool(torch.isfinite(logits).all())
    assert cache.seen == 101 and all(state.seen == 101 for state in cache.states)


def test_cublas_projections_put_every_projection_on_f_linear() -> None:
    """`--cublas-projections` (the peer of the decode GEMM kernel): every Linear of the model gets backend "torch"."""
    from hlsa.layers.linear import Linear

    plan = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    for projections, want in (("auto", "auto"), ("torch", "torch")):
        model = e2e_models.build_model("gdn_lte", replace(plan, projections=projections))
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert linears and all(m.backend == want for m in linears)


def compiled_step_on_cpu(arch: str, request: pytest.FixtureRequest):
    """`(plan, model, step)`: the smoke config's model and `decode_step` compiled with the eager backend (cheap;
    freezing only applies to Inductor) and `fullgraph`, dynamo's caches and counters reset. NSA layers decode
    through their Triton kernel, as on a GPU (`opaque_nsa_decode`)."""
    if "nsa" in arch:
        request.getfixturevalue("opaque_nsa_decode")
    plan = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    model = e2e_models.build_model(arch, plan)
    torch._dynamo.reset()
    counters.clear()
    return plan, model, torch.compile(e2e_timing.decode_step, backend="eager", fullgraph=True)


def check_steps(plan, model, step, cache: HybridCache, steps: int) -> None:
    """`steps` compiled steps on `cache` under `compile_options`, each giving the logits of the eager step on a copy."""
    eager_cache = copy.deepcopy(cache)  # random contents: the same ones in both
    token = torch.zeros(2, 1, dtype=torch.long)
    with e2e_timing.compile_options(plan, cache):
        for _ in range(steps):
            got = step(model, token, cache)
            torch.testing.assert_close(got, e2e_timing.decode_step(model, token, eager_cache), rtol=1e-5, atol=1e-5)
    assert cache.seen == eager_cache.seen


@pytest.mark.parametrize("arch", ["gdn_lte", "gdn_nsa", "transformer", "nsa"])
def test_compiled_decode_step_compiles_once(arch: str, request: pytest.FixtureRequest) -> None:
    """Under `compile_options` the token counters are symbolic from the first compile: one graph serves every step
    (the GPU run's compiles, ~1 min each with freezing, are not repeated), with the eager step's logits."""
    plan, model, step = compiled_step_on_cpu(arch, request)
    with torch.no_grad():
        cache = e2e_models.synthetic_cache(model, 2, 40)
        check_steps(plan, model, step, cache, 4)
    assert counters["stats"]["unique_graphs"] == 1
    assert cache.seen == 44


def test_a_compiles_phases_are_timed_from_a_given_point() -> None:
    """`phases_since` gives the compile phases of what compiled after the snapshot, and nothing of what came before."""
    torch._dynamo.reset()
    torch.compile(lambda x: x.sin() + 1, backend="eager")(torch.ones(3))
    before = e2e_timing.compile_phase_seconds()
    assert e2e_timing.phases_since(before, least_s=0.0) == {}
    torch.compile(lambda x: x.cos() * 2, backend="eager")(torch.ones(3))
    phases = e2e_timing.phases_since(before, least_s=0.0)
    assert phases and all(seconds >= 0 for seconds in phases.values())
    assert list(phases.values()) == sorted(phases.values(), reverse=True)


@pytest.mark.parametrize("arch", ["transformer", "gdn_nsa"])
def test_a_growing_cache_of_another_context_reuses_the_compiled_step(arch: str, request: pytest.FixtureRequest) -> None:
    """With the slots of growing caches marked dynamic before the first compile, a cache of another context (more
    slots) runs the same graph; unmarked, dynamo would compile the step again for it."""
    plan, model, step = compiled_step_on_cpu(arch, request)
    slots = []
    with torch.no_grad():
        for context in (40, 1100):  # 512 and 1536 attention slots, 1024 and 2048 NSA slots
            cache = e2e_models.synthetic_cache(model, 2, context)
            e2e_models.mark_growing_dynamic(model, cache)
            check_steps(plan, model, step, cache, 2)
            slots.append(next(s.k.shape[2] for s in cache.states if hasattr(s, "valid") or hasattr(s, "k_cmp")))
    assert slots[0] < slots[1]
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["gdn_lte", "gdn_nsa"])
def test_timed_step_matches_the_eager_step_on_cuda(arch: str) -> None:
    """The step e2e.py times (compiled with freezing and combo kernels, the Triton projections, replayed from a CUDA
    graph) advances a tiny bf16 cache as the eager step does: the same LTE evictions and buffer, close keys, LTE
    scores and GDN states, NSA compressed blocks pooled as the replays complete them (block size 4), and close logits
    from the two caches afterwards."""
    smoke = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    plan = replace(smoke, device="cuda", dtype=torch.bfloat16, compile=True, freeze=True, combo_kernels=True)
    model = e2e_models.build_model(arch, plan)
    torch.manual_seed(0)
    with torch.no_grad():
        cache = e2e_models.synthetic_cache(model, 8, 100)
        eager = copy.deepcopy(cache)
        token = torch.randint(0, model.config.vocab_size, (8, 1), device="cuda")
        step, seen = e2e_timing.prepare_step(model, cache, token, plan, graph=True, compiled=True)
        for _ in range(12):  # past the window (8 + 1) and the router margin: tokens leave the ring, are scored
            step()
        e2e_timing.set_seen(cache, seen + 12)
        while eager.seen < cache.seen:
            e2e_timing.decode_step(model, token, eager)
        got, want = (
            e2e_timing.decode_step(model, token, cache).float(),
            e2e_timing.decode_step(model, token, eager).float(),
        )
    assert (got - want).norm() <= 0.03 * want.norm()
    for graphed, reference in zip(cache.states, eager.states):
        if hasattr(reference, "buffer_len"):  # LTE
            assert torch.equal(graphed.buffer_len, reference.buffer_len)
            assert torch.equal(graphed.token_pos, reference.token_pos) and torch.equal(graphed.valid, reference.valid)
            assert torch.equal(graphed.score.isinf(), reference.score.isinf())
            finite = reference.score.isfinite()
            torch.testing.assert_close(graphed.score[finite], reference.score[finite], rtol=0.05, atol=0.05)
            torch.testing.assert_close(graphed.k.float(), reference.k.float(), rtol=0.05, atol=0.05)
            assert int(graphed.position) == int(reference.position) == cache.seen
        elif hasattr(reference, "k_cmp"):  # NSA
            for name in ("k", "v", "k_cmp", "v_cmp"):
                torch.testing.assert_close(getattr(graphed, name), getattr(reference, name), rtol=0.05, atol=0.05)
            assert int(graphed.position) == int(reference.position) == cache.seen
        else:  # GDN
            torch.testing.assert_close(graphed.recurrent, reference.recurrent, rtol=0.05, atol=0.05)


def test_bracketed_arch_times_its_short_context_again(smoke_json: dict) -> None:
    """gdn_lte's first context is timed before and after the longer ones of each batch; targets use the mean."""
    for batch in (1, 2, 3):
        order = [r["context"] for r in smoke_json["decode"] if r["arch"] == "gdn_lte" and r["batch"] == batch]
        assert order == [32, 64, 128, 32]
    rows = [{"arch": "a", "batch": 1, "context": 4, "tokens_per_s": t} for t in (100.0, 80.0)]
    assert e2e.mean_by_point(rows)[("a", 1, 4)]["tokens_per_s"] == 90.0


def test_every_point_records_its_order_and_the_gpu_state(smoke_json: dict) -> None:
    """`order` numbers the points in measurement order across the run; `gpu` is None off CUDA. A decode point says
    where its wall time went: the smoke run's steps are eager, so no graph is compiled."""
    rows = smoke_json["decode"] + smoke_json["prefill"]
    assert sorted(r["order"] for r in rows) == list(range(len(rows)))
    assert all(r["gpu"] is None for r in smoke_json["decode"])
    for r in smoke_json["decode"]:
        assert 0 < r["prepare_seconds"] < r["point_seconds"] and r["graphs_compiled"] == 0, r
        assert r["compile_phases"] == {}, r
    state = e2e_timing.parse_gpu_state("1980, 3201, 152.38, 41, 0x0000000000000004")
    assert state == {
        "clocks.sm": 1980.0,
        "clocks.mem": 3201.0,
        "power.draw": 152.38,
        "temperature.gpu": 41.0,
        "clocks_event_reasons.active": "0x0000000000000004",
    }
    assert e2e_timing.parse_gpu_state("1980, [N/A], 152.38, 41, 0x0")["clocks.mem"] is None
    with pytest.raises(ValueError, match="5 fields"):
        e2e_timing.parse_gpu_state("1980, 3201")


def test_merge_of_a_split_run_is_the_whole_run(smoke_json: dict, tmp_path) -> None:
    """`--merge` joins runs split with `--archs`: splitting the smoke run by architecture and merging it back gives
    the same rows, models and target verdicts (the CLI writes the JSON and the figures)."""
    parts = []
    for archs in ({"gdn_lte", "transformer"}, set(smoke_json["models"]) - {"gdn_lte", "transformer"}):
        command = f"{smoke_json['machine']['command']} --archs {','.join(sorted(archs))}"
        part = {**smoke_json, "machine": {**smoke_json["machine"], "command": command}}
        part["models"] = {a: m for a, m in smoke_json["models"].items() if a in archs}
        for kind in ("decode", "prefill"):
            part[kind] = [r for r in smoke_json[kind] if r["arch"] in archs]
        parts.append(part)
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, part in zip(paths, parts, strict=True):
        path.write_text(json.dumps(part))
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--merge", *map(str, paths), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(_results(out).read_text())
    assert merged["models"].keys() == smoke_json["models"].keys()
    key = lambda r: (r["arch"], r.get("batch"), r.get("context"), r.get("length"), r["order"])  # noqa: E731
    for kind in ("decode", "prefill"):
        assert sorted(map(key, merged[kind])) == sorted(map(key, smoke_json[kind]))
        assert {r["run"] for r in merged[kind]} == {0, 1}
    assert [r["command"] for r in merged["machine"]["merged_runs"]] == [p["machine"]["command"] for p in parts]
    assert [t["verdict"] for t in merged["targets"]] == [t["verdict"] for t in smoke_json["targets"]]
    assert [t["value"] for t in merged["targets"]] == [t["value"] for t in smoke_json["targets"]]
    png = _results(out).with_suffix(".png")
    assert png.exists() and png.with_name(f"{png.stem}-memory.png").exists()  # matplotlib: a dev dependency


def test_merge_replaces_an_architecture_timed_again(smoke_json: dict) -> None:
    """Merging a merged table with a later run of some of its architectures: the later rows replace those of the
    same points, the other rows and their runs stay, and a run left with no rows is dropped."""

    def part(archs: set, command: str, scale: float = 1.0) -> dict:
        out = {**smoke_json, "machine": {**smoke_json["machine"], "command": command}}
        out["models"] = {a: m for a, m in smoke_json["models"].items() if a in archs}
        for kind in ("decode", "prefill"):
            rows = [r for r in smoke_json[kind] if r["arch"] in archs]
            out[kind] = [{**r, "tokens_per_s": r.get("tokens_per_s", 0.0) * scale} for r in rows]
        return out

    others = set(smoke_json["models"]) - {"gdn_lte"}
    table = e2e.merge([part({"gdn_lte"}, "first"), part(others, "second")])
    again = e2e.merge([table, part({"gdn_lte"}, "gdn_lte again", scale=2.0)])
    assert [r["command"] for r in again["machine"]["merged_runs"]] == ["second", "gdn_lte again"]
    for kind in ("decode", "prefill"):
        old = {(r["arch"], r["order"]): r for r in table[kind]}
        for row in again[kind]:
            before = old[row["arch"], row["order"]]
            if row["arch"] == "gdn_lte":
                assert row["run"] == 1 and row["tokens_per_s"] == 2.0 * before["tokens_per_s"]
            else:
                assert row["run"] == 0 and row["tokens_per_s"] == before["tokens_per_s"]
        assert sorted((r["arch"], r["order"]) for r in again[kind]) == sorted(old)
    assert again["models"].keys() == smoke_json["models"].keys()
    assert again["copy_bandwidth_per_run"] == [smoke_json["copy_bandwidth_bytes_per_s"]] * 2


def test_merge_keeps_a_measurement_over_a_later_skip(smoke_json: dict) -> None:
    """A later run that skipped a point for its time budget did not measure it: merging keeps the earlier
    measurement of that point and takes the later run's measured points; a point only ever skipped stays skipped."""

    def run(command: str, status_of: dict) -> dict:
        rows = [{**r, **status_of.get((r["arch"], r["batch"], r["context"]), {})} for r in smoke_json["decode"]]
        return {**smoke_json, "machine": {**smoke_json["machine"], "command": command}, "decode": rows}

    points = sorted({(r["arch"], r["batch"], r["context"]) for r in smoke_json["decode"]})
    measured, skipped_later, never_measured = points[0], points[1], points[2]
    skip = {"status": e2e.SKIPPED, "tokens_per_s": None}
    first = run("first", {never_measured: skip})
    later = run("later", {skipped_later: skip, never_measured: skip})
    merged = e2e.merge([first, later])
    by_point = {(r["arch"], r["batch"], r["context"]): r for r in merged["decode"]}
    assert by_point[measured]["run"] == 1 and by_point[measured]["status"] == "ok"
    assert by_point[skipped_later]["run"] == 0 and by_point[skipped_later]["status"] == "ok"
    assert by_point[never_measured]["run"] == 1 and by_point[never_measured]["status"] == e2e.SKIPPED


@pytest.mark.parametrize(
    ("name", "slug"), [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-40GB", "a100")]
)
def test_gpu_slug_of_a_recorded_name(name: str, slug: str) -> None:
    """Merged runs are written as `e2e-<slug of the GPU they measured>.json`, whatever machine merges them."""
    assert gpu_slug(name) == slug


@pytest.mark.parametrize("option", ["--batches", "--contexts"])
@pytest.mark.parametrize("values", ["0,2", "two", ","])
def test_bad_batches_and_contexts_are_refused(option: str, values: str, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", option, values, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and f"{option}: expected comma-separated positive integers" in proc.stderr
    assert not _results(tmp_path).exists()


def test_decode_table_run_takes_the_given_contexts_and_no_prefill(tmp_path) -> None:
    """`--contexts` gives every architecture the same contexts (gdn_lte's extra one is dropped, its bracket kept),
    and `--no-prefill` leaves the prefill points out: the run behind the all-architecture decode table."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--archs", "gdn,gdn_lte", "--batches", "2", "--contexts", "40,72",
         "--no-prefill", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(_results(tmp_path).read_text())
    points = [(r["arch"], r["batch"], r["context"]) for r in results["decode"]]
    assert points == [("gdn", 2, 40), ("gdn", 2, 72), ("gdn_lte", 2, 40), ("gdn_lte", 2, 72), ("gdn_lte", 2, 40)]
    assert all(r["status"] == "ok" for r in results["decode"]) and results["prefill"] == []


def test_a_cache_larger_than_the_gpu_is_refused_before_allocating() -> None:
    """`cache_beyond_memory` sizes a point's cache on the meta device: full attention grows with the context and is
    refused past the GPU's memory, the constant-size GDN+LTE cache is not; without a GPU nothing is refused."""
    plan = e2e_models.make_plan(argparse.Namespace(smoke=True, quick=False, budget_s=None))
    attn, lte = (e2e_models.build_model(arch, plan, device="meta") for arch in ("transformer", "gdn_lte"))
    per_seq = e2e_models.synthetic_cache(attn, 1, 1024).nbytes()
    memory = 3 * per_seq
    assert e2e.cache_beyond_memory(attn, 3, 1024, memory) is None
    refused = e2e.cache_beyond_memory(attn, 4, 1024, memory)
    assert refused is not None and refused.startswith("oom: the cache needs") and "GiB" in refused
    assert e2e.cache_beyond_memory(attn, 1, 64 * 1024, memory) is not None  # longer context, more cache
    lte_seq = e2e_models.synthetic_cache(lte, 1, 1024).nbytes()
    assert e2e.cache_beyond_memory(lte, 2, 64 * 1024, 2 * lte_seq) is None  # constant size at any context
    assert e2e.cache_beyond_memory(attn, 10**6, 1024, None) is None


def test_error_text_keeps_the_cause_of_a_long_error() -> None:
    """A compile error from a worker process: the traceback comes first and the cause last, so a long message is cut
    in the middle and keeps both ends."""
    trace = "An exception occurred in a subprocess:\n" + "  File x.py, line 1, in f\n" * 100
    text = error_text(RuntimeError(trace + "CompilationError: the real cause"), limit=300)
    assert len(text) <= 305 and text.startswith("RuntimeError: An exception occurred in a subprocess:")
    assert text.endswith("CompilationError: the real cause") and " ... " in text
    assert error_text(ValueError("short\nmessage")) == "ValueError: short message"
