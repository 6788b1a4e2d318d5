"""CPU checks of benchmarks/attention_tiles.py: it refuses to run without a GPU, its candidate filter and compile pool
record failures per candidate, and the explicit tile configs it sweeps give the default's outputs (interpreted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hlsa.ops.sparse_attention import sparse_attention_ref
from hlsa.ops.triton.sparse_attention import backward_dq, column_prologue, forward, launch_config
from hlsa.ops.triton.sparse_attention_bwd import dkdv
from hlsa.ops.triton.tiles import tile_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "attention_tiles.py"
INT32_MAX = 2**31 - 1
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'benchmarks'}"}


@pytest.fixture
def tiles(monkeypatch: pytest.MonkeyPatch):
    """The benchmark script as a module (its folder on sys.path for `attention` and `benchlib`)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import attention_tiles

    return attention_tiles


@cpu_only
def test_refuses_without_a_gpu() -> None:
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr


@cpu_only
def test_compile_pool_records_each_failed_candidate(tiles) -> None:
    """A worker process that dies (here: no GPU) costs the job it was on; the rest of its list is handed out again."""
    jobs = [("fwd", 64, (128, 32, 4, 3)), ("dkdv", 128, (64, 64, 4, 2, False))]
    status = tiles.compile_all(jobs, workers=1, timeout_s=600)
    assert set(status) == set(jobs)
    for s in status.values():
        assert s.startswith("crashed (exit 1)") and "needs a CUDA GPU" in s, s


def test_candidates_fit_the_shared_memory(tiles) -> None:
    for kernel in tiles.KERNELS:
        for D in (64, 128):
            keep, skipped = tiles.candidates(kernel, D, 227 * 1024)
            assert keep[0] == tuple(launch_config(kernel, D, torch.bfloat16)) or os.environ.get("TRITON_INTERPRET")
            assert len(set(keep)) == len(keep)
            assert all(tiles.smem_estimate(kernel, c, D) <= 227 * 1024 for c in keep[1:])
            assert all(s["smem_estimate"] > 227 * 1024 for s in skipped)
    # The D = 128 forward with 128-key tiles and 3 stages would ask for more than 227 KiB.
    assert tiles.smem_estimate("fwd", (128, 128, 8, 3), 128) > 227 * 1024
    # --flagged-only: the default, then the Gluon forward's candidates alone
    default, *gluon = tiles.candidates("fwd", 64, 227 * 1024, flagged_only=True)[0]
    assert default == tiles.candidates("fwd", 64, 227 * 1024)[0][0]
    assert gluon and all(tile_config(c).flag for c in gluon)
    assert len(gluon) == sum(tile_config(c).flag for c in tiles.CANDIDATES["fwd"])


def test_config_names(tiles) -> None:
    assert tiles.cfg_name((128, 64, 4, 3), "fwd") == "128x64x4x3"
    assert tiles.cfg_name((128, 64, 4, 3, True), "dq") == "128x64x4x3ws"
    assert tiles.cfg_name((128, 64, 8, 3, True), "fwd") == "128x64x8x3gl"
    assert tiles.cfg_name((64, 64, 4, 3, True, 168), "dkdv") == "64x64x4x3pkr168"
    assert tiles.cfg_name((128, 32, 4, 3, False, 168), "fwd") == "128x32x4x3r168"


def test_summary_and_suggestion(tiles, capsys: pytest.CaptureFixture) -> None:
    """The table and the suggested launch_config entries from hand-made rows."""
    rows = []
    for T, scale in ((4096, 1.0), (16384, 1.2)):
        for kernel in tiles.KERNELS:
            for cfg, ms, default in (((128, 32, 4, 3), 1.0, True), ((128, 64, 4, 3), 0.8, False)):
                name = tiles.cfg_name(cfg, kernel)
                rows.append({"kernel": kernel, "D": 64, "T": T, "config": list(cfg), "name": name,
                             "ok": True, "ms": ms * scale, "default": default, "tflops": 100.0 / ms})  # fmt: skip
            rows.append({"kernel": kernel, "D": 64, "T": T, "config": [64, 64, 4, 3, True], "ok": False, "ms": 0.1})
    shapes = {(64, T): {"pairs": 10**9, "ours": {"prologue_ms": 0.01}} for T in (4096, 16384)}
    (s, _) = tiles.summary(rows, shapes)
    assert s["best_fwd"]["config"] == [128, 64, 4, 3] and s["default_fwd"]["config"] == [128, 32, 4, 3]
    assert abs(s["best_fwdbwd_sum_ms"] - 2.41) < 1e-9
    suggestion = tiles.suggest(rows, [64], [4096, 16384])
    assert suggestion == {f"{k} D64": [128, 64, 4, 3] for k in tiles.KERNELS}  # the failed 0.1 ms row is not taken
    # A capped config that wins is named apart: the launch table stays uncapped (torch.compile drops the cap).
    capped = [dict(r, config=[128, 32, 4, 3, False, 168], ms=r["ms"] / 2) for r in rows if r.get("default")]
    suggestion_capped = tiles.suggest(rows + capped, [64], [4096, 16384])
    assert suggestion_capped == suggestion | {f"{k} D64 capped": [128, 32, 4, 3, False, 168] for k in tiles.KERNELS}
    tiles.print_table(rows, shapes, suggestion)
    out = capsys.readouterr().out
    assert "128x64x4x3" in out and "fwd D64: (128, 64, 4, 3)" in out


def test_launch_table_has_no_register_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile's capture of the kernels keeps num_warps and num_stages but not maxnreg, so a capped default
    would break or silently lose its cap in a compiled model: the GPU table (read with the interpreter off) and the
    interpreter's tiles carry none."""
    import hlsa.ops.triton.sparse_attention as kernels

    for on in (False, True):
        monkeypatch.setattr(kernels, "interpreted", lambda on=on: on)
        for kernel in ("fwd", "dq", "dkdv"):
            for D in (32, 48, 64, 128):
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    assert tile_config(launch_config(kernel, D, dtype)).maxnreg is None, (kernel, D, dtype, on)


def test_tile_config() -> None:
    assert tile_config((64, 32, 4, 2)) == (64, 32, 4, 2, False, None)
    # the Gluon kernel (fwd), warp_specialize (dq), packed (dk/dv)
    assert tile_config((64, 32, 4, 2, True)) == (64, 32, 4, 2, True, None)
    assert tile_config((64, 32, 4, 2, False, 168)) == (64, 32, 4, 2, False, 168)  # at most 168 registers
    assert tile_config((64, 32, 4, 2, True, 0)) == (64, 32, 4, 2, True, None)
    for bad in ((64, 32, 4), (64, 32, 4, 2, False, 0, True)):
        with pytest.raises(ValueError, match="tile config"):
            tile_config(bad)


def _case(B, T, HQ, HKV, D, window, pad):
    q, k, v = (torch.randn(B, T, h, D) for h in (HQ, HKV, HKV))
    picks = torch.rand(B, HKV, T).argsort(dim=-1)[..., :5]
    ce = torch.zeros(B, HKV, T, dtype=torch.int32).scatter_(2, picks, INT32_MAX).permute(0, 2, 1).contiguous()
    km = torch.ones(B, T, dtype=torch.bool)
    km[0, :pad] = False
    return q, k, v, ce, km


def _run(q, k, v, ce, km, window, do, configs):
    """o, dq, dk, dv through the three launchers with explicit configs (None: launch_config)."""
    cols, ccount = column_prologue(ce, km, window)
    pattern = (ce, km, cols, ccount, window, q.shape[-1] ** -0.5, True)
    o, lse = forward(q, k, v, *pattern, config=configs["fwd"])
    dq, delta = backward_dq(q, k, v, o, do, lse, *pattern, config=configs["dq"])
    D = q.shape[-1]
    dk, dv = dkdv(q, k, v, do, lse, delta, *pattern, config=configs["dkdv"] or launch_config("dkdv", D, q.dtype))
    return o, dq, dk, dv


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="tiny shapes for the interpreter")
@pytest.mark.parametrize(("HQ", "HKV"), [(4, 1), (6, 2)])
def test_explicit_configs_match_default_and_reference(tiles, HQ: int, HKV: int) -> None:
    """Explicit (BM, BN, warps, stages[, flag]) per kernel: same outputs as the default tiles (16 x 16 under the
    interpreter) and as the reference, on a length no tile divides and left padding. G = 4: a forward / dq program,
    and a packed dk/dv tile, holds 32 // 4 = 8 positions of 4 heads; G = 3: the same with a padding head."""
    B, T, D, window, pad = 2, 45, 32, 5, 4
    q, k, v, ce, km = _case(B, T, HQ, HKV, D, window, pad)
    do = torch.randn_like(q)
    default = _run(q, k, v, ce, km, window, do, {"fwd": None, "dq": None, "dkdv": None})
    up = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o_ref = sparse_attention_ref(*up, window=window, column_end=ce, key_mask=km)
    ref = (o_ref, *torch.autograd.grad(o_ref, up, do))
    explicit = {"fwd": (32, 16, 2, 1), "dq": (16, 32, 1, 2, True), "dkdv": (32, 16, 2, 1)}
    other = {"fwd": (16, 32, 1, 2), "dq": (32, 16, 2, 1), "dkdv": (16, 32, 1, 2)}
    packed = {"fwd": None, "dq": None, "dkdv": (32, 16, 2, 1, True)}
    packed_small = {"fwd": None, "dq": None, "dkdv": (16, 32, 1, 2, True)}  # 4 positions of 4 heads per tile
    for configs in (explicit, other, packed, packed_small):
        with tiles.poisoned():  # the script's NaN-filled torch.empty: unwritten outputs show
            out = _run(q, k, v, ce, km, window, do, configs)
        for name, a, b, r in zip(("o", "dq", "dk", "dv"), out, default, ref):
            assert torch.isfinite(a).all(), (name, configs)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name} {configs} vs default")
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4, msg=f"{name} {configs} vs reference")


def _stand_ins(tiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[tuple, tuple, tuple]:
    """The GPU-only pieces of attention_tiles.main (compile pool, do_bench, SDPA and FlexAttention peers, device
    properties) replaced by stand-ins on tiny CPU shapes; the kernel checks stay real. Three candidates per kernel:
    one good, one that fails its compile, one whose dq is wrong (it would win if it were not checked).
    -> (good, broken, failing) configs."""
    monkeypatch.setattr(tiles, "require_gpu", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"name": "cpu"})())
    monkeypatch.setattr(tiles, "machine", lambda commit: {"gpu": "stand-in"})
    monkeypatch.setattr(tiles, "result_path", lambda name, out: tmp_path / f"{name}-test.json")
    monkeypatch.setattr(tiles, "HQ", 4)
    monkeypatch.setattr(tiles, "HKV", 1)
    monkeypatch.setattr(tiles, "TOKENS", 96)
    monkeypatch.setattr(tiles, "CHECK_T", 40)
    monkeypatch.setattr(tiles, "WINDOW", 5)

    def make_inputs(B, T, HQ, HKV, D, dtype, *, requires_grad=True):
        q, k, v, ce, _ = _case(B, T, HQ, HKV, D, 5, 0)
        return q, k, v, ce

    monkeypatch.setattr(tiles, "make_inputs", make_inputs)
    good, broken, failing = (32, 16, 2, 1), (16, 32, 1, 2, True), (32, 32, 2, 1)
    monkeypatch.setattr(tiles, "CANDIDATES", {k: [good, broken, failing] for k in tiles.KERNELS})
    timings = {good: 0.5, broken: 0.1}  # the broken config would win if it were not checked
    monkeypatch.setattr(tiles, "bench_ms", lambda fn: timings.get(fn.args[-1], 1.0))  # kernel calls end in cfg
    call = tiles.Case.call

    def wrong_for_broken(self, kernel, cfg):
        out = call(self, kernel, cfg)
        return tuple(x * 1.5 for x in out) if tuple(cfg) == broken and kernel == "dq" else out

    monkeypatch.setattr(tiles.Case, "call", wrong_for_broken)
    monkeypatch.setattr(
        tiles, "compile_all", lambda jobs, w, timeout_s: {j: "ok" if j[2] != failing else "E" for j in jobs}
    )
    monkeypatch.setattr(tiles, "time_pair", lambda fn, leaves: {"fwd_ms": 2.0, "fwdbwd_ms": 7.0})
    monkeypatch.setattr(tiles, "peers", lambda *a, **k: {"sdpa_causal_flash": {"fwd_ms": 3.0, "fwdbwd_ms": 9.0}})
    monkeypatch.setattr(tiles, "sdpa_expanded", lambda case: {"fwd_ms": 3.0, "fwdbwd_ms": 9.0})
    monkeypatch.setattr(
        tiles, "sdpa_gqa", lambda case: {"backends": {"FLASH_ATTENTION": "ok"}, "fwd_ms": 3.0, "fwdbwd_ms": 9.0}
    )
    monkeypatch.setattr(tiles, "flex_times", lambda *a: {"fwd_ms": 30.0, "fwdbwd_ms": 90.0})
    return good, broken, failing


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="tiny shapes for the interpreter")
def test_main_flow_with_cpu_stand_ins(tiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    """The whole `main` on tiny CPU shapes under the interpreter: the GPU-only pieces (compile pool, do_bench, SDPA
    and FlexAttention peers, device properties) replaced by stand-ins, the kernel checks real. One candidate fails
    its compile, one is wrong (a stand-in kernel call that returns garbage for it) and must not be picked."""
    import json

    good, broken, failing = _stand_ins(tiles, monkeypatch, tmp_path)
    argv = ["attention_tiles.py", "--dims", "32", "--lengths", "32,48", "--budget-s", "100000", "--workers", "1"]
    monkeypatch.setattr(sys, "argv", argv + ["--flex-dims", "32", "--flex-max-t", "32"])
    tiles.main()
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "attention_tiles-test.json").read_text())
    rows = result["rows"]
    assert {(r["kernel"], r["T"]) for r in rows} == {(k, T) for k in tiles.KERNELS for T in (32, 48)}
    by = {(r["kernel"], r["T"], r["name"]): r for r in rows}
    for kernel in tiles.KERNELS:
        assert by[(kernel, 32, "32x32x2x1")]["compile"] == "E" and "ms" not in by[(kernel, 32, "32x32x2x1")]
        assert by[(kernel, 32, "16x16x1x1")]["default"] and by[(kernel, 32, "16x16x1x1")]["ok"]
        assert by[(kernel, 32, "32x16x2x1")]["ok"], by[(kernel, 32, "32x16x2x1")]
    assert not by[("dq", 32, "16x32x1x2ws")]["ok"]  # wrong outputs: found by both checks
    assert by[("dq", 32, "16x32x1x2ws")]["ref_rel_err"] > 0.1
    gluon = by[("fwd", 32, "16x32x1x2gl")]  # the Gluon forward needs a Hopper GPU: its error is its row's
    assert not gluon["ok"] and "Gluon kernel" in gluon["error"] and "ms" not in gluon
    assert by[("dkdv", 32, "16x32x1x2pk")]["ok"]  # the packed dk/dv tiles
    assert result["suggested"]["dq D32"] == [32, 16, 2, 1]
    assert result["suggested"]["fwd D32"] == [32, 16, 2, 1]
    assert result["shapes"][0]["peers"]["flex_compiled"]["fwd_ms"] == 30.0
    timeline = result["shapes"][0]["ours"]["op_timeline"]  # on the CPU: the host's time per call only
    assert timeline["host_us"] > 0 and timeline["steps"] == 0
    host = result["shapes"][0]["ours"]["op_host"]  # the host's time by function: the op's own Function among them
    assert host and any("sparse_attention" in row["function"] for row in host), host
    assert "launch_config entries" in out and "dq D32: (32, 16, 2, 1)" in out


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="tiny shapes for the interpreter")
def test_compile_worker_reports_each_job(tiles, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The worker runs each job once and prints one JSON line per job; an error stays with its job."""
    import json

    monkeypatch.setattr(tiles, "WORKER_T", 40)
    monkeypatch.setattr(tiles, "WINDOW", 5)
    monkeypatch.setattr(tiles, "HQ", 4)
    monkeypatch.setattr(tiles, "HKV", 1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(
        tiles, "make_inputs", lambda B, T, HQ, HKV, D, dtype, requires_grad: _case(B, T, HQ, HKV, D, 5, 0)[:4]
    )
    jobs = [
        ("fwd", 32, (16, 16, 1, 1)),
        ("dq", 32, (16, 32, 1, 1, True)),
        ("dkdv", 32, (16, 16, 1)),
        ("dkdv", 32, (16, 32, 1, 1)),
    ]
    tiles.compile_worker(jobs)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kernel"], tuple(r["config"])) for r in lines] == [(k, c) for k, _, c in jobs]
    assert [r["status"] for r in lines[:2] + lines[3:]] == ["ok"] * 3
    assert lines[2]["status"].startswith("ValueError: tile config")


def test_kernel_resources_reads_what_triton_reports(tiles) -> None:
    """Registers, spills and shared memory per compiled kernel; None where a compiled kernel does not report one."""
    from types import SimpleNamespace

    full = SimpleNamespace(n_regs=168, n_spills=24, metadata=SimpleNamespace(name="_dkdv_band_kernel", shared=65536))
    bare = SimpleNamespace(metadata=SimpleNamespace(name="_fwd_kernel"))
    assert tiles.kernel_resources([full, bare]) == [
        {"name": "_dkdv_band_kernel", "regs": 168, "spills": 24, "shared": 65536},
        {"name": "_fwd_kernel", "regs": None, "spills": None, "shared": None},
    ]
    assert isinstance(tiles.loaded_kernels(), dict)


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="tiny shapes for the interpreter")
def test_main_sweeps_only_the_kernels_asked_for(
    tiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    _stand_ins(tiles, monkeypatch, tmp_path)
    argv = ["attention_tiles.py", "--dims", "32", "--lengths", "32", "--budget-s", "100000", "--workers", "1"]
    monkeypatch.setattr(sys, "argv", argv + ["--no-flex", "--kernels", "dkdv"])
    tiles.main()
    assert not (tmp_path / "attention_tiles-test.json").exists()  # the full sweep's file is left alone
    result = json.loads((tmp_path / "attention_tiles_dkdv-test.json").read_text())
    assert {r["kernel"] for r in result["rows"]} == {"dkdv"} and set(result["suggested"]) == {"dkdv D32"}
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  D32 ")]
    assert summary and all("op " in line and "f+b" not in line and "nan" not in line for line in summary)
    monkeypatch.setattr(sys, "argv", argv + ["--kernels", "dkdv,bwd"])
    with pytest.raises(SystemExit, match="--kernels: expected a comma-separated subset"):
        tiles.main()


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="tiny shapes for the interpreter")
def test_mma_v2_sweeps_into_a_file_of_its_own(tiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--mma-v2` sets Triton's switch for this process (and the compile workers it starts) before anything compiles,
    and writes its own results file, which says so, instead of replacing the default sweep's."""
    import json

    _stand_ins(tiles, monkeypatch, tmp_path)
    monkeypatch.delenv("DISABLE_MMA_V3", raising=False)
    argv = ["attention_tiles.py", "--dims", "32", "--lengths", "32", "--kernels", "fwd", "--budget-s", "100000"]
    monkeypatch.setattr(sys, "argv", argv + ["--no-flex", "--workers", "1", "--mma-v2"])
    try:
        tiles.main()
        assert os.environ["DISABLE_MMA_V3"] == "1"
    finally:
        os.environ.pop("DISABLE_MMA_V3", None)
    result = json.loads((tmp_path / "attention_tiles_fwd_mmav2-test.json").read_text())
    assert "DISABLE_MMA_V3" in result["mma"] and {r["kernel"] for r in result["rows"]} == {"fwd"}
    assert not (tmp_path / "attention_tiles-test.json").exists()
