"""`hlsa eval arena` end to end on untrained tiny checkpoints and a short recall task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from hlsa import demo
from hlsa.errors import UsageError
from hlsa.eval import arena


def test_settings_put_the_window_policy_at_budget_zero_only() -> None:
    assert arena.settings(["learned", "window"], [0, 8]) == [
        ("window", 0),
        ("learned", 8),
        ("learned", None),
    ]
    assert arena.settings(["random"], [0, 4]) == [("window", 0), ("random", 4)]
    assert arena.settings(["window", "oracle"], [16]) == [("window", 0), ("oracle", 16), ("oracle", None)]
    # Without a router: no learned, and no ceiling (the model as trained is).
    assert arena.settings(["learned", "h2o", "oracle"], [0, 8], router=False) == [
        ("window", 0),
        ("h2o", 8),
        ("oracle", 8),
    ]


def test_arena_runs_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hlsa.config import HybridConfig
    from hlsa.model import HybridForCausalLM

    configs = demo.arch_configs({"layers": 2, "lte_buffer": 16})
    for name in ("gdn_lte", "transformer"):
        HybridForCausalLM(HybridConfig(**configs[name])).save_pretrained(tmp_path / name)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[data]\nseq_len = 64\ntask_vocab = 256\nnum_pairs = 6\nnum_queries = 4\n[demo]\nwindow = 16\n")
    parser = argparse.ArgumentParser()
    arena.add_arena_parser(parser.add_subparsers())
    out = tmp_path / "res" / "arena.json"
    args = parser.parse_args(
        [
            "arena", str(tmp_path / "gdn_lte"), str(tmp_path / "transformer"), "--budgets", "0,4,8",
            "--examples", "2", "--recipe", str(recipe), "--threads", "1", "--out", str(out),
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    doc = json.loads(out.read_text())
    got = [(r["name"], r["policy"], r["budget"]) for r in doc["results"]]
    policies = list(arena.DEFAULT_POLICIES.split(","))
    lte = [("gdn_lte", p, b) for p, b in arena.settings(policies, [0, 4, 8])]
    full = [("transformer", p, b) for p, b in arena.settings(policies, [0, 4, 8], router=False)]
    assert got == [*lte, *full, ("transformer", "reference", None)]
    assert ("transformer", "h2o", 8) in got and ("transformer", "learned", 8) not in got
    rows = {(r["policy"], r["budget"]): r for r in doc["results"] if r["name"] == "gdn_lte"}
    full_rows = {(r["policy"], r["budget"]): r for r in doc["results"] if r["name"] == "transformer"}
    sinks = configs["gdn_lte"]["lte"]["sink_size"]
    assert rows["learned", 8]["buffer_size"] == sinks + 8 and rows["learned", None]["buffer_size"] == 64
    # Bytes grow with the buffer and do not depend on the policy.
    assert rows["window", 0]["cache_bytes"] < rows["random", 4]["cache_bytes"] < rows["random", 8]["cache_bytes"]
    assert rows["oracle", 8]["cache_bytes"] == rows["key_norm", 8]["cache_bytes"]
    # The transformer's constant caches: sinks + window + budget slots, below its full cache at the task's length.
    assert full_rows["h2o", 8]["buffer_size"] == arena.ATTN_SINKS + 8
    assert full_rows["window", 0]["cache_bytes"] < full_rows["tova", 8]["cache_bytes"]
    assert full_rows["tova", 8]["cache_bytes"] == full_rows["oracle", 8]["cache_bytes"]
    assert full_rows["tova", 8]["cache_bytes"] < full_rows["reference", None]["cache_bytes"]
    for r in doc["results"]:
        assert sum(r["queries"].values()) == 2 * 4 and 0 <= r["beyond_window"] <= 1
    assert "| gdn_lte | key_norm | 4 |" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(UsageError, match="--policies"):
        arena.run_cli(parser.parse_args(["arena", str(tmp_path / "gdn_lte"), "--policies", "h3o"]))
    with pytest.raises(UsageError, match="--policies"):  # no prompt to compress in the interleaved recall task
        arena.run_cli(parser.parse_args(["arena", str(tmp_path / "gdn_lte"), "--policies", "snapkv"]))
    with pytest.raises(UsageError, match="--tasks"):
        arena.run_cli(parser.parse_args(["arena", str(tmp_path / "gdn_lte"), "--tasks", "ppl"]))


def test_beyond_window_weights_buckets_by_their_queries() -> None:
    result = {"accuracy": {"a": 1.0, "b": 0.5, "c": 0.0}, "queries": {"a": 10, "b": 2, "c": 6}}
    assert arena.beyond_window(result) == pytest.approx(1 / 8)
