"""Tile sweep of the training attention kernels (forward, dq, dk/dv), each config checked, with peers in the same run.

Usage (GPU machine): `PYTHONPATH=src python3 benchmarks/attention_tiles.py [--budget-s 300] [--out DIR]`

For D in {64, 128}, bf16, the benchmark pattern of attention.py (B*T = 65536, HQ = 16, HKV = 4, W = 768, 4 sinks + 512
random columns per kv head):
1. every candidate (BM, BN, num_warps, num_stages[, flag]) of each kernel whose estimated shared memory
   fits the device is compiled first, in parallel worker processes on a small shape (a compiler crash or a
   resource error is recorded against that candidate only; the main process then finds the kernels in Triton's
   cache);
2. at T = 4096 each compiled candidate is checked (outputs poisoned with NaN first) against the fp32 reference on a
   small shape (T = 2992, B = 1: no tile of 32 or more divides it) and against the default config's output at the
   full shape, then timed alone (`do_bench` median); at T = 16384 the default and the three fastest of T = 4096 are
   checked and timed again;
3. peers on the same inputs: SDPA causal on K/V expanded to all heads (flash backend; expanded before timing, and
   attention.py's `sdpa_causal_flash`, which expands inside the timed call), SDPA causal with `enable_gqa=True`
   (which backends accept it is recorded, then the default choice is timed), FlexAttention with the same mask
   (compiled; at T <= --flex-max-t and D in --flex-dims, if the budget allows); all after the sweeps.
Effective TFLOP/s count attended pairs (attention.py's `attended_pairs`; causal pairs for SDPA): 4 * D FLOPs per
pair forward, 3.5x that forward + backward. Forward + backward of ours is timed as the autograd op with the default
configs, and as the sum of the kernels (prologue + forward + dq + dk/dv) with the default and the best configs.

`--mma-v2` compiles every product for the warp-level tensor-core instructions (`mma.sync`) instead of Hopper's
warpgroup ones, for a sweep of its own (`attention_tiles_mmav2-<gpu>.json`): ptxas can interleave those with the
softmax, which Triton's warpgroup products, waited on right after they are issued, do not allow.

`--budget-s` bounds the run: the compile gets 40% of it, sweeping stops when it is spent (the results so far are
still written). Writes `attention_tiles-<gpu>.json` (DIR default benchmarks/results; `attention_tiles_dkdv-<gpu>.json`
and the like for a `--kernels` subset) after each shape, and prints a
table last: per (kernel, D, T) the default and the best config, their times and TFLOP/s, then the `launch_config`
entries to paste.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from attention import WINDOW, attended_pairs, flex_times, make_inputs, peers, rel_err, time_pair
from benchlib import add_output_args, device_timeline, error_text, host_profile, machine, result_path, write_result
from hlsa.ops.triton.tiles import tile_config

HQ, HKV = 16, 4
TOKENS = 65536
# The small shape of the reference check: not a multiple of any tile of 32 or more, but a multiple of 16 like the
# benchmark's T: Triton compiles one kernel per divisibility by 16 of its integer arguments, so the check reuses them.
CHECK_T = 2992
KERNELS = ("fwd", "dq", "dkdv")
WORKER_T = 1024  # the compile workers' length: a multiple of 16 like the benchmark's (the same compiled kernels)
SMEM_DEFAULT = 227 * 1024
TARGETS = {
    64: (330, 250),
    128: (400, 300),
}  # effective TFLOP/s aimed at: forward, forward + backward  # H100 / H200 opt-in shared memory per block

# (BM, BN, num_warps, num_stages[, flag[, maxnreg]]) (`tile_config`); the forward and dq pack G = 4
# heads into BM rows (BM / 4 positions); the forward's flag runs the Gluon kernel (sparse_attention_wgmma.py; stages
# is its ring of K/V slots), dq's is warp_specialize; dk/dv: BM query rows per tile, BN keys per program, the flag
# packs the G heads into the BM rows as well (else BM positions of one head). The default config is added first where
# missing.
CANDIDATES = {
    "fwd": [
        (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4), (128, 64, 4, 2),
        (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (256, 64, 8, 2), (256, 32, 8, 3), (128, 128, 4, 2),
        # the Gluon kernel (for sm_90 with Triton 3.6, (128, 32, 4, 4) and (128, 32, 4, 5) spill 48-64 bytes at D = 128)
        (128, 64, 8, 4, True), (128, 64, 8, 5, True), (128, 32, 4, 4, True), (128, 32, 4, 5, True),
        (64, 64, 4, 4, True), (64, 32, 4, 4, True), (64, 32, 4, 5, True), (128, 32, 8, 4, True),
        # more programs per SM under a cap on registers a thread: three at 168, four at 128; under their cap at
        # D = 64 the (128, 64) tiles spill 96 bytes, the others at most 8 (sm_90; benchmarks/kernel_resources.py)
        (128, 64, 4, 3, False, 168), (128, 32, 4, 4, False, 168), (128, 32, 4, 3, False, 168),
        (128, 32, 4, 2, False, 168), (64, 64, 4, 3, False, 168), (64, 32, 4, 3, False, 168), (64, 32, 4, 3, False, 128),
    ],
    "dq": [
        (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 4, 2),
        (64, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2), (256, 32, 8, 2), (256, 64, 8, 2), (64, 128, 4, 2),
        (128, 64, 4, 3, True), (128, 32, 4, 3, True), (128, 64, 8, 3, True),
        (128, 32, 4, 3, False, 168), (64, 64, 4, 3, False, 168), (64, 32, 4, 3, False, 168), (64, 32, 4, 3, False, 128),
    ],
    "dkdv": [
        (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3),
        (32, 128, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2),
        (64, 64, 4, 2, True), (64, 64, 4, 3, True), (128, 64, 4, 2, True), (128, 64, 8, 2, True),
        (128, 64, 4, 3, True), (64, 128, 8, 2, True), (128, 128, 8, 2, True), (32, 64, 4, 3, True),
        (32, 64, 4, 2, True), (64, 32, 4, 3, True), (64, 64, 4, 4, True), (32, 32, 4, 3, True), (32, 64, 4, 4, True),
        (64, 32, 4, 4, True), (32, 128, 8, 2, True), (64, 64, 8, 3, True), (64, 128, 8, 3, True),
        (32, 64, 4, 3, True, 168), (64, 32, 4, 3, True, 168), (32, 32, 4, 3, True, 168), (32, 32, 4, 3, True, 128),
    ],
}  # fmt: skip


def smem_estimate(kernel: str, config: tuple, D: int, elt: int = 2) -> int:
    """Bytes of shared memory a config asks for, roughly: the tiles loaded in the pipelined loop times num_stages,
    plus the tiles held across it, plus one [BM, BN] fp32 layout-conversion scratch. A coarse filter only (the
    compiler decides; a candidate over the real limit fails its compile and is recorded)."""
    BM, BN, _, stages = config[:4]
    if kernel in ("fwd", "dq"):  # K and V tiles per step; q (and do, o for dq) held
        held = BM * D * elt * (1 if kernel == "fwd" else 2)
        return stages * 2 * BN * D * elt + held + BM * BN * 4
    return stages * 2 * BM * D * elt + 2 * BN * D * elt + BM * BN * 4  # q, do tiles per step; k, v held


def candidates(kernel: str, D: int, smem_limit: int, flagged_only: bool = False) -> tuple[list[tuple], list[dict]]:
    """(configs to try, default first; configs skipped because their estimate exceeds `smem_limit`). `flagged_only`:
    the default and the candidates of the kernel's variant (flag set) alone."""
    from hlsa.ops.triton.sparse_attention import launch_config

    default = tuple(launch_config(kernel, D, torch.bfloat16))
    keep, skipped = [default], []
    for cfg in CANDIDATES[kernel]:
        if (
            cfg in keep
            or (len(cfg) == 5 and not cfg[4] and cfg[:4] in keep)
            or (flagged_only and not tile_config(cfg).flag)
        ):
            continue
        if smem_estimate(kernel, cfg, D) > smem_limit:
            skipped.append({"config": list(cfg), "smem_estimate": smem_estimate(kernel, cfg, D)})
        else:
            keep.append(cfg)
    return keep, skipped


def smem_limit() -> int:
    """Shared memory one block of this GPU may opt in to (the H100's and H200's 227 KiB where torch does not say)."""
    props = torch.cuda.get_device_properties(0)
    return getattr(props, "shared_memory_per_block_optin", 0) or SMEM_DEFAULT


def parse_kernels(text: str) -> list[str]:
    """`--kernels`: a comma-separated subset of KERNELS; anything else is a usage error."""
    kernels = text.split(",")
    if set(kernels) - set(KERNELS):
        sys.exit(f"--kernels: expected a comma-separated subset of {','.join(KERNELS)}, got {text!r}")
    return kernels


def cfg_name(cfg: tuple, kernel: str) -> str:
    """`128x64x4x3`, with "gl" (forward: the Gluon kernel), "ws" (dq: warp_specialize) or "pk" (dk/dv: packed query
    tiles) for the flag, "r168" for a cap of 168 registers per thread."""
    tiles = tile_config(cfg)
    flag = {"fwd": "gl", "dq": "ws", "dkdv": "pk"}[kernel] if tiles.flag else ""
    cap = f"r{tiles.maxnreg}" if tiles.maxnreg else ""
    return "x".join(str(x) for x in tiles[:4]) + flag + cap


# --- kernel calls -----------------------------------------------------------------------------------------------


class Case:
    """Inputs of one shape (no key mask: the benchmark pattern) and the default kernels' outputs."""

    def __init__(self, B: int, T: int, D: int, *, reference: bool = False) -> None:
        import hlsa.ops.triton.sparse_attention as kernels

        self.B, self.T, self.D = B, T, D
        q, k, v, ce = make_inputs(B, T, HQ, HKV, D, torch.bfloat16, requires_grad=False)
        self.q, self.k, self.v, self.ce = q, k, v, ce
        self.pairs = attended_pairs(ce, HQ)
        self.cols, self.ccount = kernels.column_prologue(ce, None, WINDOW)
        self.pattern = (ce, q, self.cols, self.ccount, WINDOW, D**-0.5, True)  # `km is q`: no key mask
        self.do = torch.randn_like(q)
        self.default = {kernel: kernels.launch_config(kernel, D, torch.bfloat16) for kernel in KERNELS}
        self.o, self.lse = kernels.forward(q, k, v, *self.pattern, config=self.default["fwd"])
        self.dq, self.delta = kernels.backward_dq(q, k, v, self.o, self.do, self.lse, *self.pattern)
        self.dk, self.dv = self.call("dkdv", self.default["dkdv"])
        self.ref = _reference(self) if reference else None

    def call(self, kernel: str, cfg: tuple) -> tuple[torch.Tensor, ...]:
        """The kernel's outputs with `cfg`; the backward kernels take the default forward's o, lse (and delta)."""
        import hlsa.ops.triton.sparse_attention as kernels
        from hlsa.ops.triton.sparse_attention_bwd import dkdv

        q, k, v = self.q, self.k, self.v
        if kernel == "fwd":
            return kernels.forward(q, k, v, *self.pattern, config=cfg)
        if kernel == "dq":
            return kernels.backward_dq(q, k, v, self.o, self.do, self.lse, *self.pattern, config=cfg)
        return dkdv(q, k, v, self.do, self.lse, self.delta, *self.pattern, config=cfg)

    def outputs(self, kernel: str) -> tuple[torch.Tensor, ...]:
        return {"fwd": (self.o,), "dq": (self.dq,), "dkdv": (self.dk, self.dv)}[kernel]


def _reference(case: Case) -> dict:
    """fp32 reference o, dq, dk, dv of the case (dense; small shapes only)."""
    from hlsa.ops.sparse_attention import sparse_attention_ref

    up = [x.float().requires_grad_(True) for x in (case.q, case.k, case.v)]
    o = sparse_attention_ref(*up, window=WINDOW, column_end=case.ce)
    dq, dk, dv = torch.autograd.grad(o, up, case.do.float())
    out = {"fwd": (o.detach(),), "dq": (dq,), "dkdv": (dk, dv)}
    torch.cuda.empty_cache()
    return out


@contextmanager
def poisoned():
    """`torch.empty` / `empty_like` return NaN-filled tensors (ints -1) inside: outputs a kernel leaves unwritten
    show as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(fn):
        def make(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan") if t.is_floating_point() else -1)

        return make

    torch.empty, torch.empty_like = poison(empty), poison(empty_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def check(case: Case, kernel: str, cfg: tuple, against: tuple[torch.Tensor, ...], tol: float) -> tuple[bool, float]:
    """(ok, largest relative error in norm) of the kernel's outputs with `cfg` against `against`."""
    with poisoned():
        outs = case.call(kernel, cfg)
    torch.cuda.synchronize()
    outs = outs[:1] if kernel in ("fwd", "dq") else outs  # o (not lse), dq (not delta); dk and dv
    errs = [rel_err(a.float(), b.float()) if torch.isfinite(a).all() else float("inf") for a, b in zip(outs, against)]
    return all(e < tol for e in errs), max(errs)


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(case: Case, kernel: str, ms: float) -> float | None:
    """Effective TFLOP/s of the forward (4 * D per attended pair); None for the backward kernels alone."""
    return 4 * case.D * case.pairs / ms / 1e9 if kernel == "fwd" else None


# --- parallel compile ----------------------------------------------------------------------------------------------


def compile_worker(jobs: list[tuple[str, int, tuple]]) -> None:
    """Worker process: run each (kernel, D, config) once on a small shape (compiling it into Triton's cache) and print
    one JSON line per job as it finishes."""
    import hlsa.ops.triton.sparse_attention as kernels
    from hlsa.ops.triton.sparse_attention_bwd import dkdv

    torch.manual_seed(0)
    inputs = {}
    for kernel, D, cfg in jobs:
        if D not in inputs:
            q, k, v, ce = make_inputs(1, WORKER_T, HQ, HKV, D, torch.bfloat16, requires_grad=False)
            cols, ccount = kernels.column_prologue_ref(ce, None, WINDOW)  # torch: leaves compiling to the jobs
            lse = torch.randn(1, HQ, WORKER_T, device=q.device)
            inputs[D] = (q, k, v, (ce, q, cols, ccount, WINDOW, D**-0.5, True), lse, torch.randn_like(lse))
        q, k, v, pattern, lse, delta = inputs[D]
        t0 = time.perf_counter()
        try:
            if kernel == "fwd":
                kernels.forward(q, k, v, *pattern, config=cfg)
            elif kernel == "dq":
                kernels.backward_dq(q, k, v, q, q, lse, *pattern, config=cfg)
            else:
                dkdv(q, k, v, q, lse, delta, *pattern, config=cfg)
            torch.cuda.synchronize()
            status = "ok"
        except Exception as err:  # a compile or launch error belongs to this candidate only
            status = error_text(err, 300)
        line = {"kernel": kernel, "D": D, "config": list(cfg), "status": status, "s": time.perf_counter() - t0}
        print(json.dumps(line), flush=True)


def compile_all(jobs: list[tuple[str, int, tuple]], workers: int, timeout_s: float) -> dict:
    """Compile the jobs in `workers` processes, a few jobs per process; a process that dies takes down only the job it
    was on (recorded as crashed), the rest of its list is handed out again. -> {(kernel, D, cfg): status}."""
    pending = list(jobs)
    status: dict = {}
    lock = threading.Lock()
    deadline = time.monotonic() + timeout_s
    per_process = max(1, -(-len(jobs) // (2 * workers)))

    def take() -> list:
        with lock:
            batch = pending[:per_process]
            del pending[:per_process]
            return batch

    def broken() -> bool:  # every process so far died before finishing one job: the pool itself fails
        return sum(s.startswith("crashed") for s in status.values()) >= 3 and "ok" not in status.values()

    def run_batch() -> None:
        while not broken() and (batch := take()) and time.monotonic() < deadline:
            job_list = json.dumps([[kernel, D, list(cfg)] for kernel, D, cfg in batch])
            cmd = [sys.executable, __file__, "--compile-worker", job_list]
            try:
                limit = min(deadline - time.monotonic(), 60 + 30 * len(batch))  # a compiler that hangs loses its batch
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(limit, 1))
                out, err, rc = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                out, err, rc = exc.stdout or "", "timeout", None
                out = out.decode() if isinstance(out, bytes) else out
            done = set()
            for line in out.splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    key = (r["kernel"], r["D"], tuple(r["config"]))
                    status[key] = r["status"]
                    done.add(key)
            rest = [job for job in batch if job not in done]
            if rest:  # the process died (or ran out of time) on rest[0]
                tail = " ".join((err or "").strip().splitlines()[-2:])[:300]
                status[rest[0]] = f"crashed (exit {rc}): {tail}" if rc is not None else "compile timeout"
                with lock:
                    pending.extend(rest[1:])

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run_batch) for _ in range(workers)]:
            future.result()
    for job in jobs:
        status.setdefault(job, "not compiled (budget, or every worker failed)")
    return status


# --- sweep ---------------------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def loaded_kernels() -> dict[int, object]:
    """The training attention's kernels that this process has compiled or loaded from Triton's cache, by id."""
    import hlsa.ops.triton.sparse_attention as fwd
    import hlsa.ops.triton.sparse_attention_bwd as bwd
    import hlsa.ops.triton.sparse_attention_wgmma as wgmma

    found = {}
    for fn in (fwd._fwd_kernel, wgmma._fwd_wgmma_kernel, fwd._dq_kernel, bwd._dkdv_col_kernel, bwd._dkdv_band_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            found.update((id(k), k) for k in cache[0].values())
    return found


def kernel_resources(kernels: list[object]) -> list[dict]:
    """Registers per thread, spilled registers and shared memory bytes of compiled kernels (None where this Triton
    does not say): a config whose accumulators spill to local memory can run several times slower."""
    out = []
    for k in kernels:
        meta = getattr(k, "metadata", None)
        out.append({"name": getattr(meta, "name", None), "regs": getattr(k, "n_regs", None),
                    "spills": getattr(k, "n_spills", None), "shared": getattr(meta, "shared", None)})  # fmt: skip
    return out


def sweep_kernel(case: Case, kernel: str, configs: list[tuple], compiled: dict, budget: Budget, stop_at: float,
                 reference_case: Case | None) -> list[dict]:  # fmt: skip
    """Check and time each config of `kernel` on `case` until `budget.left()` falls under `stop_at`."""
    rows = []
    for cfg in configs:
        row = {"kernel": kernel, "D": case.D, "T": case.T, "config": list(cfg), "name": cfg_name(cfg, kernel)}
        row["compile"] = compiled.get((kernel, case.D, cfg), "ok")
        is_default = tuple(cfg) == tuple(case.default[kernel])
        if row["compile"] != "ok" and not is_default:
            rows.append(row)
            continue
        if budget.left() < stop_at and not is_default:
            row["skipped"] = "budget"
            rows.append(row)
            continue
        before = loaded_kernels()
        try:
            t0 = time.perf_counter()
            if reference_case is not None:
                ok, err = check(reference_case, kernel, cfg, reference_case.ref[kernel], 2e-2)
                row["ref_ok"], row["ref_rel_err"] = ok, err
            row["first_call_s"] = time.perf_counter() - t0
            ok, err = check(case, kernel, cfg, case.outputs(kernel), 1e-2)
            row["default_ok"], row["default_rel_err"] = ok, err
            row["ok"] = ok and row.get("ref_ok", True)
            row["ms"] = bench_ms(functools.partial(case.call, kernel, cfg))
            row["tflops"] = tflops(case, kernel, row["ms"])
        except Exception as err:  # a launch error of one candidate is a result, not the end of the run
            row["ok"], row["error"] = False, error_text(err, 300)
        row["default"] = is_default
        # The kernels this config's first calls loaded (none when an earlier shape already did).
        row["kernels"] = kernel_resources([k for i, k in loaded_kernels().items() if i not in before])
        rows.append(row)
        errs = (
            f"ref {row.get('ref_rel_err', float('nan')):.1e} vs-default {row.get('default_rel_err', float('nan')):.1e}"
        )
        line = f"{kernel:4} D{case.D} T{case.T} {row['name']:>12}: {row.get('ms', float('nan')):7.3f} ms"
        regs = " ".join(f"regs={k['regs']} spills={k['spills']}" for k in row["kernels"])
        print(f"{line} ok={row.get('ok')} {errs} {regs} {row.get('error', '')}", flush=True)
    torch.cuda.empty_cache()
    return rows


def best(rows: list[dict], kernel: str, D: int, T: int) -> dict | None:
    timed = [r for r in rows if (r["kernel"], r["D"], r["T"]) == (kernel, D, T) and r.get("ok") and "ms" in r]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def default_row(rows: list[dict], kernel: str, D: int, T: int) -> dict | None:
    found = [r for r in rows if (r["kernel"], r["D"], r["T"]) == (kernel, D, T) and r.get("default") and "ms" in r]
    return found[0] if found else None


def ours_totals(case: Case) -> dict:
    """The autograd op with the default configs (forward, forward + backward), the column prologue alone, and the
    timeline of the op's forward + backward (`op_timeline`, `benchlib.device_timeline`: its kernels, the GPU's idle
    time between them and what the host did meanwhile: where the op's time goes beyond its kernels timed alone), and
    the host's time per forward + backward by function (`op_host`, `benchlib.host_profile`)."""
    import hlsa.ops.triton.sparse_attention as kernels
    from hlsa.ops.sparse_attention import sparse_attention

    leaves = [x.detach().requires_grad_(True) for x in (case.q, case.k, case.v)]
    op = functools.partial(sparse_attention, *leaves, window=WINDOW, column_end=case.ce)
    out = time_pair(op, leaves)
    out["prologue_ms"] = bench_ms(functools.partial(kernels.column_prologue, case.ce, None, WINDOW))
    do = torch.randn_like(case.q)

    def step() -> None:  # as `time_pair` times it: gradients set, not added to the last step's
        for leaf in leaves:
            leaf.grad = None
        op().backward(do)

    out["op_timeline"] = device_timeline(step, steps=5, cuda=case.q.is_cuda)
    out["op_host"] = host_profile(step, steps=10)
    if case.q.is_cuda:
        torch.cuda.synchronize()
    flops = 4 * case.D * case.pairs
    if "fwd_ms" in out:
        out["fwd_tflops"] = flops / out["fwd_ms"] / 1e9
        out["fwdbwd_tflops"] = 3.5 * flops / out["fwdbwd_ms"] / 1e9
    return out


def sdpa_gqa(case: Case) -> dict:
    """Which SDPA backends take causal GQA (`enable_gqa=True`, K/V not expanded), and the default choice's times."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [x.detach().requires_grad_(True) for x in (case.q, case.k, case.v)]
    qt, kt, vt = (x.transpose(1, 2) for x in leaves)
    res = {"backends": {}}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).sum().backward()
            torch.cuda.synchronize()
            res["backends"][backend.name] = "ok"
        except Exception as err:  # "No available kernel" where the backend refuses GQA
            res["backends"][backend.name] = " ".join(str(err).split())[:200]
    res |= time_pair(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True), leaves)
    return res


def sdpa_expanded(case: Case) -> dict:
    """SDPA causal, flash backend, on K/V expanded to all query heads before timing (the kernel alone; attention.py's
    `sdpa_causal_flash` expands inside the timed call)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = HQ // HKV
    qt = case.q.detach().transpose(1, 2).contiguous().requires_grad_(True)
    kt, vt = (
        x.detach().transpose(1, 2).repeat_interleave(G, 1).contiguous().requires_grad_(True) for x in (case.k, case.v)
    )

    def causal():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    return time_pair(causal, [qt, kt, vt])


def peer_rows(case: Case, flex: bool) -> dict:
    """SDPA causal (expanded K/V, flash) and FlexAttention (same mask) via attention.py, SDPA GQA here; TFLOP/s per
    attended pair of each (causal pairs for SDPA, the pattern's pairs for Flex)."""
    leaves = [x.detach().requires_grad_(True) for x in (case.q, case.k, case.v)]
    res = {}
    if not flex:
        res = peers(*leaves, case.ce, use_flex=False, use_dense=False)
        res["sdpa_causal_flash_expanded"] = sdpa_expanded(case)
        res["sdpa_causal_gqa"] = sdpa_gqa(case)
        pairs = case.B * HQ * case.T * (case.T + 1) // 2
    else:
        qt, kt, vt = (x.transpose(1, 2) for x in leaves)
        selected = (case.ce > 0).permute(0, 2, 1).contiguous()
        res["flex_compiled"] = flex_times(qt, kt, vt, selected, leaves)
        pairs = case.pairs
    for t in res.values():
        if "fwd_ms" in t:
            t["fwd_tflops"] = 4 * case.D * pairs / t["fwd_ms"] / 1e9
            t["fwdbwd_tflops"] = 3.5 * 4 * case.D * pairs / t["fwdbwd_ms"] / 1e9
    torch.cuda.empty_cache()
    return res


def summary(rows: list[dict], shapes: dict) -> list[dict]:
    """Per (D, T): default and best time of each kernel, and forward + backward as the sum of the kernels."""
    out = []
    for (D, T), info in shapes.items():
        s = {"D": D, "T": T, "pairs": info["pairs"]}
        prologue = info.get("ours", {}).get("prologue_ms", 0.0)
        for which, pick in (("default", default_row), ("best", best)):
            picked = [pick(rows, kernel, D, T) for kernel in KERNELS]
            for kernel, r in zip(KERNELS, picked):
                s[f"{which}_{kernel}"] = None if r is None else {"config": r["config"], "ms": r["ms"]}
            if all(picked):
                total = prologue + sum(r["ms"] for r in picked)
                flops = 4 * D * info["pairs"]
                s[f"{which}_fwd_tflops"] = flops / picked[0]["ms"] / 1e9
                s[f"{which}_fwdbwd_sum_ms"] = total
                s[f"{which}_fwdbwd_tflops"] = 3.5 * flops / total / 1e9
        out.append(s)
    return out


def suggest(rows: list[dict], Ds: list[int], Ts: list[int]) -> dict:
    """Per (kernel, D): the config with the least summed time over the T's where it was checked and timed at every T
    (else the best at the first T), among configs without a cap on registers: the launch table's entries must stay
    uncapped, since torch.compile's capture of the kernels would drop the cap (docs/kernels.md). Where a capped config
    was faster still, it is given as well, under "<kernel> D<D> capped"."""
    out = {}
    for kernel in KERNELS:
        for D in Ds:
            mine = [r for r in rows if r["kernel"] == kernel and r["D"] == D and r.get("ok") and "ms" in r]
            uncapped = [r for r in mine if not tile_config(r["config"]).maxnreg]
            for key, group in ((f"{kernel} D{D}", uncapped), (f"{kernel} D{D} capped", mine)):
                if (cfg := least_summed(group, kernel, D, Ts)) is not None:
                    out[key] = list(cfg)
            if out.get(f"{kernel} D{D} capped") == out.get(f"{kernel} D{D}"):
                out.pop(f"{kernel} D{D} capped", None)
    return out


def least_summed(rows: list[dict], kernel: str, D: int, Ts: list[int]) -> tuple | None:
    """The config of `rows` (checked and timed rows of `kernel` at `D`) with the least summed time over the T's where
    it was timed at every T, else the fastest at the first T (`best`); None without rows."""
    by_cfg: dict = {}
    for r in rows:
        by_cfg.setdefault(tuple(r["config"]), {})[r["T"]] = r["ms"]
    full = {cfg: sum(t.values()) for cfg, t in by_cfg.items() if set(t) == set(Ts)}
    if full:
        return min(full, key=full.get)
    fastest = best(rows, kernel, D, Ts[0])
    return tuple(fastest["config"]) if fastest is not None else None


def print_table(rows: list[dict], shapes: dict, suggestion: dict) -> None:
    head = f"{'kernel':6} {'D':>4} {'T':>6} | {'default':>14} {'ms':>7} {'TF/s':>5} | "
    print(head + f"{'best':>14} {'ms':>7} {'TF/s':>5} {'x':>5} | ok/timed/failed")
    for D, T in shapes:
        for kernel in KERNELS:
            d, b = default_row(rows, kernel, D, T), best(rows, kernel, D, T)
            mine = [r for r in rows if (r["kernel"], r["D"], r["T"]) == (kernel, D, T)]
            n_ok = sum(1 for r in mine if r.get("ok"))
            n_timed = sum(1 for r in mine if "ms" in r)
            n_bad = sum(1 for r in mine if r.get("compile", "ok") != "ok" or r.get("ok") is False)

            def cell(r):
                if r is None:
                    return f"{'-':>14} {'-':>7} {'-':>5}"
                tf = f"{r['tflops']:5.0f}" if r.get("tflops") else f"{'':>5}"
                return f"{r['name']:>14} {r['ms']:7.3f} {tf}"

            x = f"{d['ms'] / b['ms']:5.2f}" if d and b else f"{'-':>5}"
            print(f"{kernel:6} {D:>4} {T:>6} | {cell(d)} | {cell(b)} {x} | {n_ok}/{n_timed}/{n_bad}")
    print("Effective TFLOP/s (ms), default -> best configs; f+b = prologue + fwd + dq + dkdv; op = the autograd op")
    print("with the default configs, fwd / f+b; peers fwd / f+b (SDPA per causal pair):")
    nan = float("nan")
    for s in summary(rows, shapes):
        info = shapes[(s["D"], s["T"])]
        ours, target = info.get("ours", {}), TARGETS.get(s["D"])
        aim = [f" [target {t}]" if target else "" for t in (target or (None, None))]
        fwd = [(s.get(f"{w}_fwd") or {}).get("ms", nan) for w in ("default", "best")]
        fb = [s.get(f"{w}_fwdbwd_sum_ms", nan) for w in ("default", "best")]
        line = f"  D{s['D']:<3} T{s['T']:<5} "
        if "default_fwd_tflops" in s:
            line += f"fwd {s['default_fwd_tflops']:3.0f} ({fwd[0]:.3f}) -> {s['best_fwd_tflops']:3.0f} ({fwd[1]:.3f})"
            line += f"{aim[0]} | "
        if "default_fwdbwd_tflops" in s:  # every kernel swept
            line += f"f+b {s['default_fwdbwd_tflops']:3.0f} ({fb[0]:.3f}) -> {s['best_fwdbwd_tflops']:3.0f} "
            line += f"({fb[1]:.3f}){aim[1]} | "
        line += f"op {ours.get('fwd_tflops', nan):3.0f}/{ours.get('fwdbwd_tflops', nan):3.0f}"
        line += f" [target {target[0]}/{target[1]}]" if target else ""
        for peer, label in (
            ("sdpa_causal_flash_expanded", "sdpa"),
            ("sdpa_causal_gqa", "sdpa-gqa"),
            ("flex_compiled", "flex"),
        ):
            t = info.get("peers", {}).get(peer, {})
            if "fwd_tflops" in t:
                line += f" | {label} {t['fwd_tflops']:3.0f}/{t['fwdbwd_tflops']:3.0f}"
        print(line)
    gqa = [i.get("peers", {}).get("sdpa_causal_gqa", {}).get("backends") for i in shapes.values()]
    gqa = [g for g in gqa if g]
    if gqa:
        print("SDPA causal enable_gqa, backends that ran it:", json.dumps(gqa[0]))
    print("launch_config entries (least summed ms over the T's; a capped config is not for the table, see suggest):")
    for key, cfg in suggestion.items():
        print(f"  {key}: {tuple(cfg)}")
    if all(f"{k} D{D}" in suggestion for k in KERNELS for D in (64, 128)):
        print("  as the table of launch_config (hlsa/ops/triton/sparse_attention.py):")
        for k in KERNELS:
            print(f'        "{k}": {tuple(suggestion[f"{k} D64"])} if D <= 64 else {tuple(suggestion[f"{k} D128"])},')


def require_gpu() -> None:
    if not torch.cuda.is_available():
        sys.exit(
            "attention_tiles.py needs a CUDA GPU (it compiles and times Triton kernels for Hopper); on a CPU, "
            "tests/test_attention_tiles_smoke.py checks the explicit tile configs under TRITON_INTERPRET=1"
        )
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("attention_tiles.py times compiled kernels: unset TRITON_INTERPRET")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser)
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall seconds for the whole run (default 300)")
    parser.add_argument("--dims", default="64,128", help="head dims (default 64,128)")
    parser.add_argument("--lengths", default="4096,16384", help="T values (B = 65536 / T; default 4096,16384)")
    parser.add_argument("--top", type=int, default=3, help="configs of the first T re-timed at the others (default 3)")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--flex-max-t", type=int, default=4096, help="FlexAttention only up to this T")
    parser.add_argument("--flex-dims", default="64", help="FlexAttention only at these head dims (default 64)")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument(
        "--kernels", default=",".join(KERNELS), help="comma-separated subset of fwd,dq,dkdv to sweep (default all)"
    )
    parser.add_argument(
        "--mma-v2",
        action="store_true",
        help="compile every product for the warp-level tensor-core instructions (mma.sync, as on Ampere) instead of "
        "Hopper's warpgroup ones (Triton's DISABLE_MMA_V3=1, for this process and its compile workers)",
    )
    parser.add_argument(
        "--flagged-only",
        action="store_true",
        help="only the default and each kernel's variant (the Gluon forward, warp-specialised dq, packed dk/dv), "
        "into a results file of its own",
    )
    parser.add_argument("--compile-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_gpu()
    if args.mma_v2:  # before anything compiles: Triton reads it per compile, and its cache key includes it
        os.environ["DISABLE_MMA_V3"] = "1"
    if args.compile_worker:
        compile_worker([(kernel, D, tuple(cfg)) for kernel, D, cfg in json.loads(args.compile_worker)])
        return
    swept = parse_kernels(args.kernels)
    budget = Budget(args.budget_s)
    torch.manual_seed(0)
    Ds = [int(x) for x in args.dims.split(",")]
    Ts = [int(x) for x in args.lengths.split(",")]
    smem = smem_limit()
    result = {"machine": machine(args.commit), "dtype": "bfloat16", "HQ": HQ, "HKV": HKV, "window": WINDOW,
              "tokens": TOKENS, "smem_limit": smem, "budget_s": args.budget_s,
              "mma": "mma.sync (DISABLE_MMA_V3=1)" if args.mma_v2 else "default",
              "flagged_only": args.flagged_only}  # fmt: skip
    # A sweep of some kernels, or with other products, gets a file of its own, so that it does not replace the full
    # sweep's.
    name = "attention_tiles" if set(swept) == set(KERNELS) else "attention_tiles_" + "_".join(swept)
    name += ("_mmav2" if args.mma_v2 else "") + ("_flagged" if args.flagged_only else "")
    path = result_path(name, args.out)
    configs, skipped = {}, {}
    for kernel in swept:
        for D in Ds:
            configs[kernel, D], skipped[f"{kernel} D{D}"] = candidates(kernel, D, smem, args.flagged_only)
    result["smem_skipped"] = skipped
    jobs = [(kernel, D, cfg) for (kernel, D), cfgs in configs.items() for cfg in cfgs]
    t0 = time.monotonic()
    compiled = compile_all(jobs, args.workers, timeout_s=max(0.4 * budget.left(), 30))
    result["compile_s"] = time.monotonic() - t0
    result["compile"] = [{"kernel": k, "D": D, "config": list(c), "status": s} for (k, D, c), s in compiled.items()]
    n_ok = sum(1 for s in compiled.values() if s == "ok")
    print(f"compiled {n_ok}/{len(jobs)} candidates in {result['compile_s']:.0f} s with {args.workers} workers")
    if n_ok == 0:  # the worker processes failed as such: compile in this process instead (errors still per config)
        print("  no worker compiled anything: each candidate compiles in this process when first called", flush=True)
        result["compile_fallback"] = True
        compiled = {}
    failed = [(k, D, c, s) for (k, D, c), s in compiled.items() if s != "ok"]
    for k, D, c, s in failed[:25]:
        print(f"  not compiled: {k} D{D} {cfg_name(c, k)}: {s[:160]}")
    if len(failed) > 25:
        print(f"  ... and {len(failed) - 25} more (the results file lists them)")
    rows: list[dict] = []
    shapes: dict = {}
    result["rows"], result["shapes"] = rows, []

    def save() -> None:
        result["shapes"] = [{"D": D, "T": T, **info} for (D, T), info in shapes.items()]
        result["summary"] = summary(rows, shapes)
        result["suggested"] = suggest(rows, Ds, Ts)
        write_result(path, result)

    later = len(Ds) * (len(Ts) - 1)  # shapes that only retime the top configs (~20 s each)
    # Kept back for the later shapes, the op and SDPA peers (~10 s a shape) and FlexAttention.
    # FlexAttention (about a minute to compile) only if the compile left enough: the sweep comes first.
    flex = not args.no_flex and budget.left() > 200
    reserve = 20.0 * later + 10.0 * len(Ds) * len(Ts) + (90.0 if flex else 0.0)
    for n, T in enumerate(Ts):
        for i, D in enumerate(Ds):
            if n == 0:  # an equal share of what is left (after the reserve) for each shape of the first T
                stop_at = budget.left() - (budget.left() - reserve) / (len(Ds) - i)
            else:
                stop_at = reserve - 20.0 * ((n - 1) * len(Ds) + i + 1)
            ref_case = Case(1, CHECK_T, D, reference=True) if n == 0 else None
            case = Case(TOKENS // T, T, D)
            info = shapes.setdefault((D, T), {"B": case.B, "pairs": case.pairs})
            for j, kernel in enumerate(swept):
                # Each kernel gets a share of this shape's time in proportion to its candidates (so a slow compile of
                # one cannot starve the next).
                share = len(configs[kernel, D]) / sum(len(configs[k, D]) for k in swept[j:])
                k_stop = budget.left() - (budget.left() - stop_at) * share
                cfgs = configs[kernel, D]
                if n > 0:  # the default and the fastest checked configs of the first T
                    first = [r for r in rows if (r["kernel"], r["D"], r["T"]) == (kernel, D, Ts[0]) and r.get("ok")]
                    top = [tuple(r["config"]) for r in sorted(first, key=lambda r: r["ms"])[: args.top]]
                    cfgs = [tuple(case.default[kernel])] + [c for c in top if c != tuple(case.default[kernel])]
                rows.extend(sweep_kernel(case, kernel, cfgs, compiled, budget, k_stop, ref_case))
            del case, ref_case
            torch.cuda.empty_cache()
            save()
    # The op and the peers after every sweep: a peer that fails badly (an SDPA backend forced onto GQA) cannot cost
    # the sweep.
    for (D, T), info in shapes.items():
        case = Case(TOKENS // T, T, D)
        info["ours"] = ours_totals(case)
        info["peers"] = peer_rows(case, flex=False)
        del case
        torch.cuda.empty_cache()
        save()
    print_table(rows, shapes, result["suggested"])  # printed again at the end with FlexAttention
    if not flex and not args.no_flex:
        print("FlexAttention skipped: the compile left too little of the budget")
    if flex:
        for D in [int(x) for x in args.flex_dims.split(",")]:
            for T in [t for t in Ts if t <= args.flex_max_t and (D, t) in shapes]:
                if budget.left() < 90:  # FlexAttention compiles its forward and backward first (about a minute)
                    shapes[(D, T)]["peers"]["flex_compiled"] = {"error": "skipped: budget"}
                    continue
                case = Case(TOKENS // T, T, D)
                shapes[(D, T)]["peers"] |= peer_rows(case, flex=True)
                del case
                save()
    save()
    print_table(rows, shapes, result["suggested"])
    print(f"wrote {path}; {budget.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
