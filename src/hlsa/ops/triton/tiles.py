"""Tile configurations of the training attention kernels (forward, dq, dk/dv): what a sweep varies per launch.

A config is written as a tuple `(BM, BN, num_warps, num_stages[, flag[, maxnreg]])`, the form the
launch table (`sparse_attention.launch_config`) and the tile sweep (benchmarks/attention_tiles.py) use; `tile_config`
reads it into a `TileConfig`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TileConfig(NamedTuple):
    """One launch's tiles and options.

    BM, BN: query rows and keys per tile. warps, stages: Triton's `num_warps` and `num_stages`.
    flag: each kernel's variant. Forward: the Gluon kernel with asynchronous warpgroup products
    (sparse_attention_wgmma.py; bf16 or fp16 on a Hopper GPU; `stages` is then its ring of K/V slots, 4 or more). dq:
    warp specialisation of the band's mask-free interior loop into producer and consumer warps
    (`tl.range(..., warp_specialize=True)`). dk/dv: packed query tiles (BM // GP positions of each query head of the
    group, instead of BM positions of one head).
    maxnreg: a cap on registers per thread (Triton's `maxnreg`; None: no cap), so that more programs fit on an SM at
    the price of spills.
    """

    BM: int
    BN: int
    warps: int
    stages: int
    flag: bool = False
    maxnreg: int | None = None

    def launch_options(self) -> dict:
        """Triton's launch options. The cap is passed only when set, so that a default launch passes only the
        options that torch.compile's capture of user-defined Triton kernels knows (it has no `maxnreg`)."""
        options = {"num_warps": self.warps, "num_stages": self.stages}
        return (options | {"maxnreg": self.maxnreg}) if self.maxnreg else options


def tile_config(config: tuple) -> TileConfig:
    """A `TileConfig` from a 4- to 6-tuple (flag off and no cap when left out; a cap of 0 is no cap)."""
    if len(config) not in (4, 5, 6):
        raise ValueError(f"tile config must be (BM, BN, num_warps, num_stages[, flag[, maxnreg]]); got {config}")
    BM, BN, warps, stages = (int(x) for x in config[:4])
    flag = bool(config[4]) if len(config) >= 5 else False
    maxnreg = int(config[5]) if len(config) >= 6 and config[5] else None
    return TileConfig(BM, BN, warps, stages, flag, maxnreg)


def precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: fp32 inputs get exact fp32 products (the reference's arithmetic); bf16 and fp16
    ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"
