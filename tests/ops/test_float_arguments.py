"""Triton kernels take Python float arguments as torch.compile passes them: a direct launch passes a Python float as
an fp32 scalar, Inductor (which compiles the user-defined kernels of a compiled model) as fp64. A kernel whose
loop-carried fp32 state meets an fp64 scale fails to compile, and one that multiplies tiles by it computes them in
fp64, at a fraction of the fp32 rate. Each kernel is compiled for sm_90 (no GPU needed) with its floats typed fp64,
and its Triton IR may use fp64 only to take the argument and convert it to fp32."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Capture the launches of one launcher, compile each kernel with fp64 floats, print the IR lines that use fp64.
_SCRIPT = """
import sys

import torch

from kernel_resources import captured_launches, compile_launch, launches_of

which = sys.argv[1]
if which in ("fwd", "dq", "dkdv"):
    launches = launches_of(which, 64, None)
elif which == "nsa_decode":
    from hlsa.ops.triton import nsa_decode as mod

    B, HQ, HKV, D = 2, 8, 2, 64
    q = torch.randn(B, HQ, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, HKV, 256, D, dtype=torch.bfloat16) for _ in range(2))
    kc, vc = (torch.randn(B, HKV, 4, D, dtype=torch.bfloat16) for _ in range(2))
    gates = [torch.rand(B, HQ, dtype=torch.bfloat16) for _ in range(3)]
    with captured_launches([mod.nsa_decode_kernel]) as launches:
        mod.nsa_decode_triton(q, k, v, kc, vc, *gates, start=torch.zeros(B, dtype=torch.int32),
                              seq_len=torch.tensor(200), block_size=64, block_counts=2, window=128, scale=0.125)
else:  # the gated delta rule's decode step
    from hlsa.ops.triton import gated_delta_decode as mod

    B, H, K, V = 2, 4, 64, 64
    proj = torch.randn(B, 2 * H * K + H * V + 2 * H, dtype=torch.bfloat16)
    with captured_launches([mod.gdn_step_inputs_kernel, mod.gated_delta_step_kernel]) as launches:
        mod.gated_delta_decode_triton(proj, None, None, torch.zeros(H), torch.zeros(H), torch.zeros(B, H, K, V),
                                      gated=False, dtype=torch.bfloat16, l2_eps=1e-6)
for fn, args, kwargs in launches:
    if not any(isinstance(a, float) for a in args):
        continue
    ttir = compile_launch(fn, args, kwargs, float_type="fp64").asm["ttir"]
    for line in ttir.splitlines():
        if "f64" in line and not line.lstrip().startswith("tt.func") and "arith.truncf" not in line:
            print(fn.__name__, line.strip()[:200])
    print("compiled", fn.__name__)
"""


@pytest.mark.parametrize(
    ("which", "kernels"),
    [
        ("fwd", ["_fwd_kernel"]),
        ("dq", ["_dq_kernel"]),
        ("dkdv", ["_dkdv_col_kernel", "_dkdv_band_kernel"]),
        ("nsa_decode", ["nsa_decode_kernel"]),
        ("gated_delta_decode", ["gated_delta_step_kernel"]),
    ],
)
def test_kernel_compiles_with_fp64_floats_and_computes_in_fp32(
    which: str, kernels: list[str], sm90_compile_env: dict
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, which], capture_output=True, text=True, timeout=600, env=sm90_compile_env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("compiled ")] == kernels
    assert not [line for line in lines if not line.startswith("compiled ")], proc.stdout[-2000:]
