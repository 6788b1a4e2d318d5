"""Registers and spills of the training attention's kernels, compiled for Hopper (sm_90) on any machine, no GPU.

Usage: `PYTHONPATH=src python3 benchmarks/kernel_resources.py [--dims 64,128] [--kernels fwd,dq,dkdv]
[--defaults-only] [--dtype bfloat16|float32] [--out DIR]`

A kernel that needs more than the 255 registers a thread may hold spills the rest to local memory (the stack), and
a spilling attention kernel runs up to several times slower. Whether a tile config spills depends on the Triton
that compiles it, not on the GPU: each launcher (`forward`, `backward_dq`, `dkdv`) is run on small CPU tensors of
the benchmark pattern (attention.py's: HQ = 16, HKV = 4, W = 768, columns) with its kernels' launches captured
instead of run, every captured launch is compiled for sm_90 (`triton.compile` with the launch's argument types and
the alignment Triton would specialise them on, TMA where an H100 takes it), and `cuobjdump -res-usage` reads
registers per thread and stack bytes from the cubin. Compile with the Triton of the GPU machine (its version is
in the results file's `triton`):

    python3 -m pip install --target /tmp/triton36 --no-deps triton==3.6.0
    PYTHONPATH=/tmp/triton36:src python3 benchmarks/kernel_resources.py

Writes `kernel_resources-sm90.json` (`kernel_resources_float32-sm90.json` with `--dtype float32`; DIR default
benchmarks/results): per kernel, D and tile config, every compiled kernel's name, registers, stack bytes and shared
memory, and what decides whether its warpgroup products overlap its other work: whether ptxas serialised them, how
many exponentials lie between a product's issue and its wait in the SASS, and each loop's issue cost per trip
(`loop_paths`: the fewest and the most instructions a thread issues from the loop's head to its back edge, and the
opcodes of the fewest; a mask-free tile takes the fewest).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

from attention import WINDOW
from attention_tiles import CANDIDATES, HKV, HQ, KERNELS, cfg_name, parse_kernels
from benchlib import add_output_args, error_text, machine, write_result

T_CAPTURE = 1024  # the launchers' length: a multiple of 16, as the benchmark's (the same specialisation)
SM90 = (9, 0)


@contextmanager
def captured_launches(kernels: list | None = None):
    """Inside, launches of `kernels` (`@triton.jit` functions; default the training attention's) are recorded as
    `(kernel, args, kwargs)` instead of run (`torch.cuda.get_device_capability` answers sm_90 so that the launchers
    pick the Hopper paths)."""
    import hlsa.ops.triton.sparse_attention_wgmma as wgmma

    if kernels is None:
        import hlsa.ops.triton.sparse_attention as fwd
        import hlsa.ops.triton.sparse_attention_bwd as bwd

        kernels = [fwd._prologue_kernel, fwd._fwd_kernel, wgmma._fwd_wgmma_kernel, fwd._dq_kernel,
                   bwd._zero_column_rows_kernel, bwd._dkdv_col_kernel, bwd._dkdv_band_kernel]  # fmt: skip
    launches: list[tuple] = []

    def recorder(fn):  # `kernel[grid](...)` calls `kernel.run(..., grid=, warmup=)`
        def run(*args, grid, warmup, **kwargs):
            launches.append((fn, args, kwargs))

        return run

    with mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: SM90):
        with contextlib.ExitStack() as stack:
            # The Gluon forward's check wants CUDA tensors; the launches are only recorded here.
            stack.enter_context(mock.patch.object(wgmma, "supported", lambda q, k: True))
            for fn in kernels:
                stack.enter_context(mock.patch.object(fn, "run", recorder(fn)))
            yield launches


def launches_of(kernel: str, D: int, config: tuple | None, dtype: torch.dtype = torch.bfloat16) -> list[tuple]:
    """The kernel launches of one launcher (`kernel` in fwd, dq, dkdv) with `config` (None: `launch_config`), on the
    benchmark pattern at `T_CAPTURE` tokens in `dtype`; the launches of the column prologue and of the zeroing of the
    dk/dv column partials (a few registers, nothing to tune) are left out."""
    import hlsa.ops.triton.sparse_attention as fwd
    import hlsa.ops.triton.sparse_attention_bwd as bwd
    from hlsa.ops.triton.sparse_attention_bwd import dkdv

    torch.manual_seed(0)
    q = torch.randn(1, T_CAPTURE, HQ, D, dtype=dtype)
    k, v = (torch.randn(1, T_CAPTURE, HKV, D, dtype=dtype) for _ in range(2))
    ce = torch.zeros(1, T_CAPTURE, HKV, dtype=torch.int32)
    ce[:, ::8] = 2**31 - 1  # columns: every 8th key
    lse = torch.zeros(1, HQ, T_CAPTURE)
    with captured_launches() as launches:
        cols, ccount = fwd.column_prologue(ce, None, WINDOW)
        pattern = (ce, q, cols, ccount, WINDOW, D**-0.5, True)  # `km is q`: no key mask
        if kernel == "fwd":
            fwd.forward(q, k, v, *pattern, config=config)
        elif kernel == "dq":
            fwd.backward_dq(q, k, v, q, q, lse, *pattern, config=config)
        else:
            dkdv(q, k, v, q, lse, lse, *pattern, config=config or fwd.launch_config("dkdv", D, q.dtype))
    return [launch for launch in launches if launch[0] not in (fwd._prologue_kernel, bwd._zero_column_rows_kernel)]


def compile_launch(fn, args: tuple, kwargs: dict, float_type: str = "fp32"):
    """`fn` compiled for sm_90 with the types and alignment of one captured launch's arguments. Python floats are
    `float_type`: fp32 as a direct launch passes them, fp64 as torch.compile (Inductor) does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    from triton.runtime.jit import mangle_type

    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    # A Gluon kernel also takes `num_warps` as a parameter: it is both an argument and an option.
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names or k == "num_warps"}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = values[name]
        if param.is_constexpr or value is None or (isinstance(value, int) and value == 1):
            signature[name], constexprs[name] = "constexpr", value  # Triton specialises ints equal to 1 too
            continue
        signature[name] = float_type if isinstance(value, float) else mangle_type(value)
        aligned = (isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0) or (
            isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0
        )
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source_type = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    source = source_type(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    with quiet_stderr():  # a failing pass prints its whole module; the error that follows says enough
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null inside (the compiler's C++ passes write there, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cuobjdump(compiled, flag: str) -> str:
    """`cuobjdump <flag>` of a compiled kernel's cubin (the cuobjdump that comes with Triton)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(compiled.asm["cubin"])
        return subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> dict:
    """Registers per thread, stack bytes (spilled registers) and shared memory of a compiled kernel's cubin."""
    out = cuobjdump(compiled, "-res-usage")
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    if not found:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG/STACK line: {out[-300:]!r}")
    return {"regs": int(found.group(1)), "stack": int(found.group(2)), "shared": compiled.metadata.shared}


def wgmma_serialized(compiled) -> bool:
    """Whether ptxas serialises the kernel's warpgroup products, each waited for before the next instruction that may
    need its tensor cores' time (it says so as it assembles the kernel's PTX: `ptxas -v`, "wgmma.mma_async
    instructions are serialized"); a kernel built on asynchronous products then overlaps nothing."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(compiled.asm["ptx"])
        command = [get_ptxas(90).path, "--gpu-name", "sm_90a", "-v", str(path), "-o", str(path.with_suffix(".cubin"))]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
    return "serialized" in out.stdout + out.stderr


def exponentials_in_flight(text: str) -> int:
    """The most exponentials (MUFU.EX2) in a kernel's SASS between a warpgroup product's issue (HGMMA) and the next
    wait on products (WARPGROUP.DEPBAR): the softmax work that runs while the tensor cores do."""
    most, count, issued = 0, 0, False
    for op in re.findall(r"\b(HGMMA|WARPGROUP\.DEPBAR|MUFU\.EX2)", text):
        if op == "HGMMA":
            issued = True
        elif op == "WARPGROUP.DEPBAR":
            most, count, issued = max(most, count), 0, False
        elif issued:
            count += 1
    return most


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_paths(text: str) -> list[dict]:
    """The loops of a kernel's SASS (a branch back to an earlier address), each with the fewest and the most
    instructions a thread issues on one trip from its head to its back edge (inner loops, such as waits that spin on
    a barrier, counted once), and the twelve commonest opcodes of the fewest (`MUFU` for `MUFU.EX2`): a loop's cost in
    issue slots, per path. Largest first."""
    code = [(int(m.group(1), 16), m.group(2) is not None, m.group(3), m.group(4)) for m in SASS_LINE.finditer(text)]

    def target(op: str, operands: str) -> int | None:
        found = re.search(r"0x([0-9a-f]+)\s*$", operands.strip()) if op == "BRA" else None
        return int(found.group(1), 16) if found else None

    loops = []
    for latch, _, op, operands in code:
        head = target(op, operands)
        if head is None or head > latch:
            continue
        body = [c for c in code if head <= c[0] <= latch]
        index = {c[0]: i for i, c in enumerate(body)}
        fewest: list[tuple[int, list[str]] | None] = [None] * len(body)
        most: list[int | None] = [None] * len(body)
        fewest[0], most[0] = (1, [body[0][2]]), 1
        for i, (address, pred, op_i, operands_i) in enumerate(body[:-1]):
            if fewest[i] is None:
                continue  # not reached from the head on a forward path
            to = target(op_i, operands_i)
            ends = op_i in ("EXIT", "RET") or (op_i == "BRA" and not pred and "P" not in operands_i.split(",")[0])
            steps = ([i + 1] if not ends else []) + (
                [index[to]] if to is not None and to > address and to in index else []
            )
            for j in steps:
                count, ops = fewest[i]
                if fewest[j] is None or count + 1 < fewest[j][0]:
                    fewest[j] = (count + 1, ops + [body[j][2]])
                most[j] = max(most[j] or 0, most[i] + 1)
        if fewest[-1] is None:
            continue
        mix = Counter(op.split(".")[0] for op in fewest[-1][1])
        loops.append({"head": hex(head), "latch": hex(latch), "fewest": fewest[-1][0], "most": most[-1],
                      "fewest_mix": dict(mix.most_common(12))})  # fmt: skip
    return sorted(loops, key=lambda loop: -loop["most"])


def issue_report(fn, compiled) -> dict:
    """What the results file records of one compiled kernel: registers, stack and shared memory, whether ptxas
    serialised its warpgroup products, the exponentials between a product's issue and its wait, and its loops' issue
    cost per trip (`loop_paths`; spin loops of one or two instructions left out)."""
    text = cuobjdump(compiled, "-sass")
    loops = [loop for loop in loop_paths(text) if loop["most"] > 2]
    return {"name": fn.__name__, **resource_usage(compiled), "serialized": wgmma_serialized(compiled),
            "exponentials_in_flight": exponentials_in_flight(text), "loops": loops}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    parser.add_argument("--dims", default="64,128", help="head dims (default 64,128)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="subset of fwd,dq,dkdv (default all)")
    parser.add_argument(
        "--defaults-only", action="store_true", help="only the launch_config tiles (default: every sweep candidate)"
    )
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="input dtype (default bfloat16)"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_resources.py compiles for sm_90: unset TRITON_INTERPRET")
    kernels = parse_kernels(args.kernels)
    import triton

    from hlsa.ops.triton.sparse_attention import launch_config

    rows = []
    for kernel in kernels:
        for D in (int(d) for d in args.dims.split(",")):
            default = tuple(launch_config(kernel, D, dtype))
            for cfg in dict.fromkeys([default, *([] if args.defaults_only else CANDIDATES[kernel])]):
                row = {"kernel": kernel, "D": D, "config": list(cfg), "name": cfg_name(cfg, kernel)}
                row["default"] = cfg == default
                try:
                    row["compiled"] = [issue_report(fn, compile_launch(fn, a, kw)) for fn, a, kw in
                                       launches_of(kernel, D, cfg, dtype)]  # fmt: skip
                except Exception as err:  # a config that does not compile is a result, not the end of the run
                    row["error"] = error_text(err, 300)
                rows.append(row)
                usage = "  ".join(f"{c['name']} regs={c['regs']} stack={c['stack']}" for c in row.get("compiled", []))
                print(f"{kernel:4} D{D:<3} {row['name']:>12}{' (default)' if row['default'] else '':10} "
                      f"{usage or row.get('error', '')}", flush=True)  # fmt: skip
    result = {"machine": machine(args.commit), "target": "sm_90", "triton": triton.__version__, "dtype": args.dtype,
              "pattern": {"HQ": HQ, "HKV": HKV, "window": WINDOW, "T": T_CAPTURE}, "rows": rows}  # fmt: skip
    name = "kernel_resources" if dtype == torch.bfloat16 else f"kernel_resources_{args.dtype}"
    path = Path(args.out or Path(__file__).parent / "results") / f"{name}-sm90.json"
    write_result(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
