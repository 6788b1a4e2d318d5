"""Eviction pictures: the retained set agrees with `lte_column_end`, the PNG has the promised size, the CLI works."""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import pytest
import torch

from hlsa.eval.inspect import EVICTED, RETAINED, SINK, WINDOW, figure_size_px, retained_at_end, token_span


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize(
    ("t", "window", "buffer_size", "sinks"),
    [(40, 5, 6, 2), (23, 3, 1, 1), (17, 0, 4, 0), (12, 20, 3, 2), (50, 7, 60, 4)],
    ids=["typical", "tiny-buffer", "zero-window", "all-in-window", "buffer-larger-than-history"],
)
def test_retained_set_matches_column_end(t: int, window: int, buffer_size: int, sinks: int) -> None:
    from hlsa.ops.lte_retention import lte_column_end

    g = torch.Generator().manual_seed(t)
    score = torch.randn(t, 3, generator=g)
    score[5:9, 0] = 0.25  # ties: the earlier key must win
    state = retained_at_end(score, window=window, buffer_size=buffer_size, sink_size=sinks)
    ranked = score.clone()
    ranked[:sinks] = float("inf")
    column_end = lte_column_end(ranked[None], window=window, buffer_size=buffer_size)[0].T  # [HKV, T]
    last = t - 1
    pos = torch.arange(t)
    visible = (pos >= last - window)[None, :] | (column_end > last)
    assert torch.equal(state != EVICTED, visible)
    assert torch.equal(state == WINDOW, (pos >= last - window)[None, :].expand_as(state))
    assert ((state == RETAINED) | (state == SINK)).sum(dim=1).le(buffer_size).all()
    assert (state[:, sinks:] != SINK).all()


def test_token_span() -> None:
    offsets = [(0, 1), (1, 2), (2, 3), (3, 3), (3, 5)]
    assert token_span(offsets, 1, 3) == (1, 3)
    assert token_span(offsets, 4, 5) == (4, 5)
    with pytest.raises(ValueError):
        token_span(offsets, 7, 8)


def test_inspect_command(tiny_lte_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hlsa.eval.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    png, js = tmp_path / "pic.png", tmp_path / "kept.json"
    argv = ["eval", "inspect", str(tiny_lte_dir), "--niah", "niah_multikey_2", "--length", "450", "--depth", "30"]
    args = parser.parse_args([*argv, "--out", str(png), "--json", str(js)])
    assert args.func(args) == 0
    assert _png_size(png) == figure_size_px(2)  # the tiny config has two LTE layers
    report = json.loads(js.read_text())
    assert [entry["layer"] for entry in report["layers"]] == [1, 3]
    assert all(len(entry["kept"]) == 2 and max(entry["kept"]) <= report["buffer_size"] for entry in report["layers"])
    a, b = report["needle_tokens"]
    assert 0 < a < b < report["num_tokens"]
    assert "retained after" in capsys.readouterr().out


def test_inspect_marks_a_custom_needle(tiny_lte_dir: Path, tmp_path: Path) -> None:
    from hlsa.eval.inspect import inspect_prompt, render
    from hlsa.loading import load_model, load_tokenizer

    model, tok = load_model(tiny_lte_dir, device=torch.device("cpu")), load_tokenizer(tiny_lte_dir, None)
    prompt = "Remember: the code is 4417. " + "Filler text goes here. " * 6 + "What is the code?"
    start = prompt.index("4417")
    result = inspect_prompt(model, tok, prompt, needle=(start, start + 4))
    assert result.needle == (start, start + 4)  # byte tokenizer: one token per ASCII character
    assert result.states[0].shape == (2, len(prompt))
    render(result, str(tmp_path / "p.png"))
    assert _png_size(tmp_path / "p.png") == figure_size_px(2)
