"""Checkpoint files: atomic replacement, the `latest` pointer, pruning, and the RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hlsa.config import HybridConfig
from hlsa.train import checkpoint as ckpt


def save(root: Path, step: int, value: float, keep: int = 2) -> Path:
    config = HybridConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, gdn={"num_heads": 2})
    emb = torch.full((4, 2), value)
    sd = {"embed.weight": emb, "lm_head.weight": emb}  # tied: shares storage
    return ckpt.save_checkpoint(
        root, step, config=config, model_sd=sd, optim_sd={"v": value}, trainer_state={"step": step}, keep=keep
    )


def test_save_load_latest_and_prune(tmp_path: Path) -> None:
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save(tmp_path, step, float(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000003"
    model_sd, optim_sd, state = ckpt.load_checkpoint(latest)
    assert float(model_sd["lm_head.weight"][0, 0]) == 3.0 and optim_sd == {"v": 3.0} and state == {"step": 3}
    assert (latest / "config.json").is_file()


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 5, 1.0)
    save(tmp_path, 5, 2.0)
    model_sd, _, _ = ckpt.load_checkpoint(tmp_path / "step-00000005")
    assert float(model_sd["embed.weight"][0, 0]) == 2.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


def test_torn_checkpoint_is_reported(tmp_path: Path) -> None:
    save(tmp_path, 1, 1.0)
    (tmp_path / "step-00000001" / "trainer.pt").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.latest_checkpoint(tmp_path)


def test_rng_round_trip() -> None:
    state = ckpt.rng_state()
    a = (torch.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
