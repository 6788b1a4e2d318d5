"""benchmarks/kernel_resources.py on the CPU: the training attention's kernels compiled ahead of time for sm_90 (no
GPU needed), their registers and spills read from the cubin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "kernel_resources.py"


def test_default_tiles_compile_for_sm90_and_spill_little(tmp_path: Path, sm90_compile_env: dict) -> None:
    """Every bf16 default tile compiles for sm_90 and spills at most 512 bytes per thread (the most is the D = 64 dk/dv
    column kernel's: 176 with Triton 3.6, 264 with 3.9), so that a tile change that spills kilobytes fails here, before
    any GPU run."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dims", "64,128", "--defaults-only", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=sm90_compile_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernel_resources-sm90.json").read_text())
    assert result["target"] == "sm_90" and result["triton"] and result["machine"]["command"]
    assert [(row["kernel"], row["D"]) for row in result["rows"]] == [
        (kernel, D) for kernel in ("fwd", "dq", "dkdv") for D in (64, 128)
    ]
    for row in result["rows"]:
        assert row["default"] and "error" not in row, row
        names = {c["name"] for c in row["compiled"]}  # the prologue's and the zeroing's launches are left out
        want = {"fwd": {"_fwd_kernel"}, "dq": {"_dq_kernel"}, "dkdv": {"_dkdv_col_kernel", "_dkdv_band_kernel"}}
        assert names == want[row["kernel"]]
        for c in row["compiled"]:
            assert 0 < c["regs"] <= 255 and 0 <= c["stack"] <= 512 and c["shared"] > 0, (row["kernel"], row["D"], c)
    assert "_dkdv_band_kernel regs=" in proc.stdout


def test_default_float32_tiles_do_not_spill(tmp_path: Path, sm90_compile_env: dict) -> None:
    """fp32 products run on the FP32 units, so fp32 needs tiles of its own: with the bf16 ones each kernel spilled
    2-14 KiB per thread at D = 48 and took up to a minute to compile."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dims", "48", "--defaults-only", "--dtype", "float32", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=sm90_compile_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernel_resources_float32-sm90.json").read_text())
    assert result["dtype"] == "float32" and [row["kernel"] for row in result["rows"]] == ["fwd", "dq", "dkdv"]
    for row in result["rows"]:
        assert row["default"] and "error" not in row, row
        for c in row["compiled"]:
            assert c["stack"] <= 256, (row["kernel"], c)


def test_a_register_cap_reaches_the_compiler(sm90_compile_env: dict) -> None:
    """A tile config's sixth element caps the registers per thread (Triton's `maxnreg`): the forward's default tile
    takes more than 168 uncapped, and at most 168 with the cap."""
    script = (
        "from kernel_resources import compile_launch, launches_of, resource_usage\n"
        "for cfg in [(128, 64, 4, 3), (128, 64, 4, 3, False, 168)]:\n"
        "    (launch,) = launches_of('fwd', 64, cfg)\n"
        "    print(resource_usage(compile_launch(*launch))['regs'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=sm90_compile_env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    uncapped, capped = (int(line) for line in proc.stdout.split())
    assert uncapped > 168 >= capped


def test_bad_kernel_names_are_refused(tmp_path: Path, compile_env: dict) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kernels", "dkdv,bwd", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=compile_env,
    )  # fmt: skip
    assert proc.returncode != 0 and "--kernels: expected a comma-separated subset" in proc.stderr


def _sass(*lines: str) -> str:
    """cuobjdump -sass lines, one instruction each, at addresses 0x0000, 0x0010, ..."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))


def test_loop_paths_count_each_path_of_a_loop_once(monkeypatch) -> None:
    """A loop of 12 instructions whose body either skips three instructions or not, holding a barrier wait that spins
    on itself: 9 instructions on the short path, 12 on the long one (the spin counted once), the opcodes of the short
    one; the branch out of the loop and the spin are not loops of their own unless they go back."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import kernel_resources

    text = _sass(
        "IMAD R1, R2, R3, RZ",  # 0x00: head
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R5",  # 0x10
        "@!P0 BRA 0x10",  # 0x20: spins on the wait
        "@P1 BRA 0x70",  # 0x30: skips 0x40-0x60
        "MUFU.EX2 R4, R4",
        "MUFU.EX2 R5, R5",
        "FADD R6, R4, R5",
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24",  # 0x70
        "@P2 BRA 0x200",  # 0x80: out of the loop
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        "IADD3 R7, R7, 0x1, RZ",
        "@P3 BRA 0x0",  # 0xb0: the back edge
        "EXIT",
    )
    loops = kernel_resources.loop_paths(text)
    assert [(loop["head"], loop["latch"], loop["fewest"], loop["most"]) for loop in loops] == [
        ("0x0", "0xb0", 9, 12),
        ("0x10", "0x20", 2, 2),
    ]
    assert loops[0]["fewest_mix"]["BRA"] == 4 and "MUFU" not in loops[0]["fewest_mix"]
    assert kernel_resources.exponentials_in_flight(text) == 0  # the exponentials come before the product
    late = text.replace("MUFU.EX2 R5, R5", "HGMMA.64x64x16.F32.BF16 R56, gdesc[UR8], R56")
    assert kernel_resources.exponentials_in_flight(late.replace("FADD R6, R4, R5", "MUFU.EX2 R6, R6")) == 1
