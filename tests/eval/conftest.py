"""Shared fixtures of the evaluation tests: tiny saved checkpoints (configs/tiny) with the byte tokenizer.

The models are saved with `backend="torch"`: the pure-PyTorch references everywhere (on CPU, the default picks
a per-position scan for the LTE retention rule, which is much slower than the brute-force reference at these sizes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny"


def _save_tiny(name: str, path: Path) -> Path:
    """A randomly initialised tiny model of `configs/tiny/<name>.json` (byte vocabulary) saved with its tokenizer."""
    from hlsa.config import HybridConfig
    from hlsa.model import HybridForCausalLM
    from hlsa.tokenizer import VOCAB_SIZE, byte_tokenizer

    fields = {k: v for k, v in json.loads((TINY_CONFIGS / f"{name}.json").read_text()).items() if k != "model_type"}
    fields.update(vocab_size=VOCAB_SIZE, bos_token_id=257, eos_token_id=258, pad_token_id=256, backend="torch")
    torch.manual_seed(0)
    HybridForCausalLM(HybridConfig(**fields)).eval().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="package")
def tiny_lte_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GDN + LTE (window 8, buffer 6, 2 sinks; LTE layers 1 and 3)."""
    return _save_tiny("gdn_lte", tmp_path_factory.mktemp("tiny_lte"))


@pytest.fixture(scope="package")
def tiny_swa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GDN + SWA (window 8; SWA layers 1 and 3)."""
    return _save_tiny("gdn_swa", tmp_path_factory.mktemp("tiny_swa"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """These models are tiny: intra-op threads only add synchronisation (80x slower forwards on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def tiny_attn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Transformer (full attention in every layer)."""
    return _save_tiny("transformer", tmp_path_factory.mktemp("tiny_attn"))
