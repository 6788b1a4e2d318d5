"""Gated delta rule on one GPU: fla-core's kernels against our reference, then timings against our PyTorch path.

Usage (GPU machine with fla-core): `PYTHONPATH=src python3 benchmarks/gpu_check_gdn.py [--out DIR]`
Writes `gpu_check_gdn-<gpu>.json` in DIR (default benchmarks/results) and prints a table. Runs in about a
minute (most of it is Triton compiling and autotuning fla's kernels).

Checks, at B=2, T=512, H=4, K=V=D in {64, 128}, inputs in fp32 and bf16 (`g` and the state in fp32):
* truth: `gated_delta_rule_ref` (step by step) in fp64 on CPU copies of the same inputs (it is slow on a GPU);
* fla chunk kernel (outputs, final state and the gradients of q, k, v, g, beta, h0), fla fused recurrent kernel
  (forward only: it has no backward), our chunked PyTorch path on the GPU (forward and gradients);
* the layer (0.4B GDN dims): fla dispatch vs the torch backend, and prefill + decode (fused recurrent) vs full.
On Hopper, fla refuses its gated chunk backward under Triton < 3.7.1 (fla reported wrong results in
`chunk_bwd_dqkwg` on some builds); we bypass the guard and let the gradient checks above tell whether it is right here.

Timing: 32K tokens (B=8, T=4096), H=8, K=V=128 (the 0.4B GDN layer), bf16 inputs: fla chunk vs our chunked path,
forward and forward + backward. TFLOP/s use the chunk algorithm's count per token and head,
4CK + C(K+V) + 2CV + 6KV with C=64 (forward), and 3x that for forward + backward.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchlib import add_output_args, machine, result_path, write_result
from hlsa.layers.gdn import GatedDeltaNet
from hlsa.ops.gated_delta import (
    CHUNK_SIZE,
    allow_fla_gated_backward_on_hopper,
    chunk_gated_delta_rule,
    gated_delta_rule_chunked,
    gated_delta_rule_ref,
)

DEVICE = "cuda"
GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype) -> dict:
    """The layer's regime: unit-norm keys, beta in (0, 1), log decay <= 0 (fp32), fp32 initial state."""
    q = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    k = F.normalize(torch.randn(B, T, H, D, device=DEVICE), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=DEVICE) + 2.0)
    beta = torch.rand(B, T, H, device=DEVICE).to(dtype)
    h0 = torch.randn(B, H, D, D, device=DEVICE)
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": h0}


def leaves(inputs: dict, *, device: str, dtype: torch.dtype | None = None) -> dict:
    return {n: x.detach().to(device=device, dtype=dtype or x.dtype).requires_grad_(True) for n, x in inputs.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def forward_backward(fn, inputs: dict, do: torch.Tensor, dht: torch.Tensor) -> dict:
    """Run `fn` (our op signature), backpropagate `<o, do> + <ht, dht>`; returns o, ht and the input gradients."""
    o, ht = fn(**inputs, output_final_state=True)
    loss = (_upcast(o) * do.to(o.device)).sum() + (_upcast(ht) * dht.to(ht.device)).sum()
    loss.backward()
    return {"o": o, "ht": ht, **{n: inputs[n].grad for n in GRAD_NAMES}}


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # fp32 at least, fp64 stays fp64 (the truth must not be rounded to fp32)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_op(D: int, dtype: torch.dtype, *, B: int = 2, T: int = 512, H: int = 4) -> list[dict]:
    """Relative errors of each GPU path against the fp64 CPU reference, on the same (dtype-rounded) inputs."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    inputs = make_inputs(B, T, H, D, dtype)
    do, dht = torch.randn(B, T, H, D, device=DEVICE), torch.randn(B, H, D, D, device=DEVICE)
    truth = forward_backward(gated_delta_rule_ref, leaves(inputs, device="cpu", dtype=torch.float64), do, dht)

    def fla_chunk(**kw):
        return chunk_gated_delta_rule(**kw, backend="fla")  # T > 64 with grad: fla's chunk kernel

    rows = []
    for name, fn in (("fla_chunk", fla_chunk), ("torch_chunked", gated_delta_rule_chunked)):
        got = forward_backward(fn, leaves(inputs, device=DEVICE), do, dht)
        rows.append({"path": name, **{f"err_{n}": rel_err(got[n], truth[n]) for n in got}})
    with torch.no_grad():
        o, ht = fused_recurrent_gated_delta_rule(
            q=inputs["q"],
            k=inputs["k"],
            v=inputs["v"],
            g=inputs["g"],
            beta=inputs["beta"],
            scale=D**-0.5,
            initial_state=inputs["initial_state"],
            output_final_state=True,
        )
    rows.append({"path": "fla_fused_recurrent", "err_o": rel_err(o, truth["o"]), "err_ht": rel_err(ht, truth["ht"])})
    for row in rows:
        row.update(D=D, T=T, dtype=str(dtype).removeprefix("torch."))
    return rows


def check_layer(*, B: int = 2, T: int = 512, n_decode: int = 12, dims: tuple = (1024, 8, 128)) -> dict:
    """The layer in bf16: fla dispatch vs torch backend (forward, grad of x), and prefill + decode vs full."""
    hidden, heads, head_dim = dims
    layer = GatedDeltaNet(hidden_size=hidden, num_heads=heads, head_dim=head_dim).to(DEVICE, torch.bfloat16)
    x = torch.randn(B, T, hidden, device=DEVICE, dtype=torch.bfloat16)
    out = {}
    grads = {}
    for backend in (None, "torch"):
        layer.backend = backend
        xb = x.clone().requires_grad_(True)
        y, _ = layer(xb, pad_mask=None, state=None)
        y.float().square().mean().backward()
        out[backend], grads[backend] = y.detach(), xb.grad
    layer.backend = None
    with torch.no_grad():
        state = layer.init_state(B, device=DEVICE, dtype=torch.bfloat16)
        pieces = [layer(x[:, : T - n_decode], pad_mask=None, state=state)[0]]
        pieces += [layer(x[:, t : t + 1], pad_mask=None, state=state)[0] for t in range(T - n_decode, T)]
    return {
        "err_y_fla_vs_torch": rel_err(out[None], out["torch"]),
        "err_dx_fla_vs_torch": rel_err(grads[None], grads["torch"]),
        "err_prefill_decode_vs_full": rel_err(torch.cat(pieces, 1), out[None]),
    }


def bench(fn, grads: list[torch.Tensor]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def time_paths(*, B: int = 8, T: int = 4096, H: int = 8, D: int = 128) -> list[dict]:
    """Median ms, tok/s and TFLOP/s of fla chunk and our chunked path, bf16 inputs, forward and forward + backward."""
    inputs = make_inputs(B, T, H, D, torch.bfloat16)
    C = CHUNK_SIZE
    flops_fwd = B * T * H * (4 * C * D + C * 2 * D + 2 * C * D + 6 * D * D)
    paths = {
        "fla_chunk": lambda **kw: chunk_gated_delta_rule(**kw, backend="fla"),
        "torch_chunked": gated_delta_rule_chunked,
    }
    rows = []
    for name, fn in paths.items():
        x = leaves(inputs, device=DEVICE)
        do = torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():
            fwd_ms = bench(lambda fn=fn, x=x: fn(**x), list(x.values()))
        fwdbwd_ms = bench(lambda fn=fn, x=x, do=do: fn(**x)[0].backward(do), list(x.values()))
        rows.append(
            {
                "path": name,
                "B": B,
                "T": T,
                "H": H,
                "D": D,
                "fwd_ms": fwd_ms,
                "fwdbwd_ms": fwdbwd_ms,
                "fwd_tok_per_s": B * T / fwd_ms * 1e3,
                "fwd_tflops": flops_fwd / fwd_ms / 1e9,
                "fwdbwd_tflops": 3 * flops_fwd / fwdbwd_ms / 1e9,
            }
        )
        torch.cuda.empty_cache()
    return rows


def print_table(result: dict) -> None:
    print(f"\n{result['machine']}")
    names = ("o", "ht", *GRAD_NAMES)
    print(f"{'path':<20} {'dtype':<9} {'D':>4} | " + " ".join(f"{n[:7]:>8}" for n in names))
    for r in result["checks"]:
        errs = " ".join(f"{r[f'err_{n}']:8.1e}" if f"err_{n}" in r else f"{'-':>8}" for n in names)
        print(f"{r['path']:<20} {r['dtype']:<9} {r['D']:>4} | {errs}")
    print(f"\nlayer (bf16, 0.4B dims): {result['layer']}")
    print(f"\n{'path':<14} {'fwd ms':>8} {'f+b ms':>8} {'Mtok/s':>7} {'TF/s f':>7} {'TF/s fb':>7}")
    for r in result["timing"]:
        print(
            f"{r['path']:<14} {r['fwd_ms']:8.2f} {r['fwdbwd_ms']:8.2f} {r['fwd_tok_per_s'] / 1e6:7.2f} "
            f"{r['fwd_tflops']:7.1f} {r['fwdbwd_tflops']:7.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check_gdn.py needs a CUDA device and fla-core")
    torch.manual_seed(0)
    guard_bypassed = allow_fla_gated_backward_on_hopper()
    checks = [row for D in (64, 128) for dtype in (torch.float32, torch.bfloat16) for row in check_op(D, dtype)]
    result = {"machine": machine(args.commit), "hopper_guard_bypassed": guard_bypassed, "checks": checks}
    result |= {"layer": check_layer(), "timing": time_paths()}
    print_table(result)
    write_result(result_path("gpu_check_gdn", args.out), result)


if __name__ == "__main__":
    main()
