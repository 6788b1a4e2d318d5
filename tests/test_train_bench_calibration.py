"""CPU check of benchmarks/train.py's operating point: `route_to_kept` moves the LTE routers' biases so that each
head keeps the asked number of tokens, from the authors' start (+0.5: nearly all kept) and from a negative one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hlsa.config import HybridConfig
from hlsa.layers.lte import LTEAttention
from hlsa.model import HybridForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # benchmarks import as siblings
import train as bench_train  # noqa: E402


@pytest.mark.parametrize(("bias", "kept"), [(0.5, 20), (-1.0, 37)])
def test_route_to_kept_hits_the_count_per_head(bias: float, kept: int) -> None:
    torch.manual_seed(0)
    lte = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "window_size": 8, "buffer_size": 8, "sink_size": 2}
    config = HybridConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=4,
        mixers=["gdn", "lte", "gdn", "lte"],
        gdn={"num_heads": 2, "head_dim": 16},
        lte={**lte, "router_bias_init": bias, "dropout_prob": 0.0},
    )
    model = HybridForCausalLM(config)
    ids = torch.randint(0, 97, (3, 160))
    before = bench_train.kept_per_head(model, ids)
    bench_train.route_to_kept(model, kept, ids, rounds=3)
    # per head: count the positive logits of each LTE layer's router on the calibration batch
    counts = []
    hooks = [
        m.router.conv_stack.register_forward_hook(lambda mod, a, out: counts.append((out > 0).float().sum(-1).mean(1)))
        for m in model.modules()
        if isinstance(m, LTEAttention)
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    per_head = torch.cat(counts)  # [layers * HKV] mean kept tokens per sequence
    assert abs(before - kept) > 10  # the start is far from the target
    assert torch.allclose(per_head, torch.full_like(per_head, float(kept)), atol=3.0), per_head
