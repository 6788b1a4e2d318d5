"""The Gluon forward of sparse attention (hlsa/ops/triton/sparse_attention_wgmma.py). Gluon has no interpreter: on
the CPU the kernel is compiled for sm_90 (registers, spills, and the schedule it exists for: the next tile's
logits issued before this tile's exponentials); on a Hopper GPU it is checked against the reference."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hlsa.ops.lte_retention import lte_column_end_scan
from hlsa.ops.sparse_attention import sparse_attention_ref
from hlsa.ops.triton.sparse_attention import column_prologue, forward
from hlsa.ops.triton.sparse_attention_wgmma import forward_wgmma

from .test_sparse_attention import INT32_MAX, make_case, poisoned_empty, rel_err  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[2]
# (BM, BN, warps, stages, Gluon): none spills at D = 64 or 128
CONFIGS = [(128, 64, 8, 4, True), (64, 64, 4, 4, True), (64, 32, 4, 5, True)]

# Compiles each case's launch for sm_90 and prints its registers and stack bytes, whether ptxas serialised the
# warpgroup products, and the most exponentials between a product's issue and its wait (kernel_resources.py's
# `issue_report`).
COMPILE_SCRIPT = """
import json, sys
import torch
from kernel_resources import captured_launches, compile_launch, issue_report
import hlsa.ops.triton.sparse_attention as fwd
import hlsa.ops.triton.sparse_attention_wgmma as wgmma

for HQ, HKV, D, use_cols, key_mask, cfg in json.loads(sys.argv[1]):
    T, W = 1024, 100
    q = torch.randn(1, T, HQ, D, dtype=torch.bfloat16)
    k, v = (torch.randn(1, T, HKV, D, dtype=torch.bfloat16) for _ in range(2))
    ce = torch.zeros(1, T, HKV, dtype=torch.int32)
    ce[:, ::8] = 2**31 - 1
    km = torch.ones(1, T, dtype=torch.bool) if key_mask else None
    cols, ccount = fwd.column_prologue_ref(ce, km, W)
    pattern = (ce, cols, ccount, W) if use_cols else (q, q, q, T)
    with captured_launches() as launches:
        fwd.forward(q, k, v, pattern[0], q if km is None else km, *pattern[1:], D**-0.5, use_cols, config=tuple(cfg))
    (launch,) = [l for l in launches if l[0] is wgmma._fwd_wgmma_kernel]
    report = issue_report(launch[0], compile_launch(*launch))
    print(json.dumps({"case": [HQ, HKV, D, use_cols, key_mask, cfg], **report}))
"""


def test_compiles_for_sm90_without_spills_and_overlaps(sm90_compile_env: dict) -> None:
    """Configs of the tile sweep, at D = 64 and 128, with and without columns or a key mask, one head per group or
    three, compile for sm_90 with no spilled registers, and the products overlap the softmax: ptxas does not serialise
    them (it does for a kernel that reads a product's registers while the product may still run), and a whole tile's
    exponentials (BM * BN / (32 * warps) per thread) run between a product's issue and its wait. The version that
    waited for its products where it read them had at most 16 of the 32 there, and ptxas serialised it."""
    cases = [[16, 4, D, True, False, list(cfg)] for D in (64, 128) for cfg in CONFIGS]
    cases += [[16, 4, 64, False, False, [64, 64, 4, 4, True]], [4, 4, 32, False, True, [64, 32, 4, 4, True]]]
    cases += [[6, 2, 128, True, True, [128, 64, 8, 4, True]], [2, 2, 16, True, False, [64, 32, 4, 5, True]]]
    env = {**sm90_compile_env, "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'benchmarks'}"}
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, json.dumps(cases)],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [row["case"] for row in rows] == cases
    for row in rows:
        BM, BN, warps = row["case"][-1][:3]
        assert 0 < row["regs"] <= 255 and row["stack"] == 0, row
        assert not row["serialized"], row
        assert row["exponentials_in_flight"] >= BM * BN // (32 * warps), row


def test_refused_where_it_cannot_run() -> None:
    """On the CPU, or in fp32, a config that asks for the Gluon kernel is refused with the way out."""
    q, k, v, ce, _ = make_case(1, 40, 4, 2, 32, 5, 0)
    cols, ccount = column_prologue(ce, None, 5)
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match="Gluon kernel.*drop the config's flag"):
            forward(*(x.detach().to(dtype) for x in (q, k, v)), ce, q, cols, ccount, 5, 32**-0.5, True,
                    config=(64, 32, 4, 4, True))  # fmt: skip
    # configs the kernel cannot run, refused before any launch: a ring of 3 slots, 4 warps for 32 rows, a register cap
    for bad in ((64, 32, 4, 3, True), (32, 32, 4, 4, True), (64, 32, 4, 4, True, 168)):
        with pytest.raises(ValueError, match="needs stages >= 4, 4 or 8 warps, BM >= 16 \\* warps and no register cap"):
            forward_wgmma(q, k, v, ce, q, cols, ccount, 5, 32**-0.5, True, config=bad)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize(
    "B,T,HQ,HKV,D,window,n_cols,pad",
    [
        (2, 1000, 8, 2, 64, 100, 40, 17),  # training columns, left padding
        (1, 2992, 16, 4, 128, 768, 512, 0),  # the benchmark's pattern, T not a tile multiple
        (2, 333, 3, 1, 32, 5, 20, 0),  # G = 3: a padding head in each packed tile
        (1, 77, 4, 4, 64, 0, None, 0),  # one head per group, the band alone, window 0
        (1, 300, 4, 2, 64, None, None, 9),  # full causal attention
        (2, 500, 4, 2, 64, 7, "inference", 6),  # finite column ends (the per-query top-N rule), sinks
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(B, T, HQ, HKV, D, window, n_cols, pad, dtype, poisoned_empty) -> None:  # noqa: F811
    torch.set_default_device("cuda")
    try:
        q, k, v, ce, km = make_case(B, T, HQ, HKV, D, None if n_cols == "inference" else n_cols, pad)
        if n_cols == "inference":
            score = torch.randn(B, T, HKV)
            score[:, pad : pad + 2] = float("inf")
            score[0, :pad] = float("-inf")
            ce = lte_column_end_scan(score, window=window, buffer_size=13)
        q, k, v = (x.detach().to(dtype) for x in (q, k, v))
        window_eff = T if window is None else min(window, T)
        use_cols = ce is not None and window_eff < T
        cols, ccount = column_prologue(ce, km, window_eff) if use_cols else (q, q)
        pattern = (ce if use_cols else q, q if km is None else km, cols, ccount, window_eff, D**-0.5, use_cols)
        ref = sparse_attention_ref(*(x.double() for x in (q, k, v)), window=window, column_end=ce, key_mask=km)
        o_triton, lse_triton = forward(q, k, v, *pattern, config=(64, 32, 4, 3))
        for cfg in CONFIGS:  # outputs start as NaN (`poisoned_empty`): every element must be written
            o, lse = forward(q, k, v, *pattern, config=cfg)
            assert torch.isfinite(o).all(), cfg
            assert rel_err(o, ref) < 2e-2, (cfg, rel_err(o, ref))
            # lse: +inf exactly where the Triton kernel has it (rows that see no key), close elsewhere
            assert torch.equal(lse.isinf(), lse_triton.isinf()), cfg
            seen = lse_triton.isfinite()
            torch.testing.assert_close(lse[seen], lse_triton[seen], atol=2e-2, rtol=1e-3, msg=str(cfg))
    finally:
        torch.set_default_device(None)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU (sm_90)")
def test_rows_that_see_no_key(poisoned_empty) -> None:  # noqa: F811
    """A left-padded row whose window holds only padding sees no key: o = 0 and lse = +inf, as the Triton kernel
    writes them."""
    torch.set_default_device("cuda")
    try:
        q, k, v, ce, km = make_case(2, 200, 8, 2, 64, 10, 50)
        q, k, v = (x.detach().to(torch.bfloat16) for x in (q, k, v))
        ce[0, 10, 0] = INT32_MAX  # a padding key selected as a column stays invisible too
        cols, ccount = column_prologue(ce, km, 3)
        o, lse = forward(q, k, v, ce, km, cols, ccount, 3, 0.125, True, config=CONFIGS[0])
        assert (o[0, :50] == 0).all() and lse[0, :, :50].isinf().all() and (lse[0, :, :50] > 0).all()
        assert torch.isfinite(o).all() and lse[:, :, 50:].isfinite().all()
    finally:
        torch.set_default_device(None)
