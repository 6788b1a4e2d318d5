"""Tiny models of every architecture, shared by the model tests."""

from pathlib import Path

import pytest
import torch

from hlsa import HybridConfig, HybridForCausalLM

CONFIGS_DIR = Path(__file__).parents[2] / "configs"
TINY = CONFIGS_DIR / "tiny"
ARCHS = ["gdn", "gdn_swa", "gdn_attn", "gdn_lte", "gdn_nsa", "transformer", "nsa"]
CONSTANT_MEMORY = ["gdn", "gdn_swa", "gdn_lte"]


def tiny_config(arch: str, **overrides) -> HybridConfig:
    return (
        HybridConfig.from_json_file(TINY / f"{arch}.json")
        if not overrides
        else HybridConfig(**{**HybridConfig.from_json_file(TINY / f"{arch}.json").to_dict(), **overrides})
    )


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> HybridForCausalLM:
    torch.manual_seed(seed)
    model = HybridForCausalLM(tiny_config(arch, **overrides)).to(dtype)
    # At init the router's bias (+0.5) keeps almost every token; centre it so that scores are mixed in sign: some
    # tokens are kept, some evicted, and the buffer fills up, which is what the cache tests must exercise.
    for name, p in model.named_parameters():
        if "router" in name and name.endswith("proj.bias"):
            torch.nn.init.zeros_(p)
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param
