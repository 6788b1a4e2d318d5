"""Options files, command-line overrides and the `hlsa train` / `hlsa demo` parsers."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hlsa.train.cli import collect_overrides, register
from hlsa.train.options import build_options, read_options_file

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hlsa")
    register(p.add_subparsers(dest="command"))
    return p


def test_precedence_defaults_file_cli(tmp_path: Path) -> None:
    f = tmp_path / "o.toml"
    f.write_text('[optim]\nlr = 1e-3\nwarmup_steps = 7\n[data]\nsource = "synthetic:mqar"\n')
    args = parser().parse_args(["train", "--options", str(f), "--optim.lr", "2e-3", "--steps", "5", "--resume"])
    opts = build_options(read_options_file(args.options), collect_overrides(args))
    assert opts.optim.lr == 2e-3 and opts.optim.warmup_steps == 7  # CLI beats file, file beats default
    assert opts.optim.eps == 1e-15 and opts.optim.clip == 1.0  # SPEC 4 defaults
    assert opts.train.steps == 5 and opts.checkpoint.resume is True and opts.data.source == "synthetic:mqar"


def test_yaml_and_types(tmp_path: Path) -> None:
    f = tmp_path / "o.yaml"
    f.write_text("train:\n  steps: 3\n  skip_nan_inf: false\noptim:\n  lr: 1\n")
    opts = build_options(read_options_file(f), {"log.tensorboard": "false"})
    assert opts.train.steps == 3 and opts.train.skip_nan_inf is False
    assert isinstance(opts.optim.lr, float) and opts.log.tensorboard is False


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown option optim.lrr"):
        build_options(overrides={"optim.lrr": 1})
    with pytest.raises(ValueError, match="unknown options section"):
        build_options({"optimizer": {"lr": 1}})
    with pytest.raises(ValueError, match="unknown options section"):
        build_options(overrides={"demo.layers": 2})  # a file's [demo] table is skipped; a flag for it is a typo
    assert build_options({"demo": {"layers": 2}, "train": {"steps": 3}}).train.steps == 3
    with pytest.raises(ValueError, match="expects int"):
        build_options({"train": {"steps": 1.5}})
    with pytest.raises(ValueError, match="boolean"):
        build_options(overrides={"train.skip_nan_inf": "maybe"})
    with pytest.raises(ValueError, match="does not exist"):
        read_options_file(tmp_path / "nope.toml")
    (tmp_path / "o.ini").write_text("")
    with pytest.raises(ValueError, match="suffix"):
        read_options_file(tmp_path / "o.ini")


def test_committed_recipes_parse() -> None:
    recipes = sorted((REPO / "configs" / "train").glob("*.toml"))
    assert {r.stem for r in recipes} >= {"demo", "gdn_lte_0.4B", "gdn_lte_1.4B"}
    for r in recipes:
        build_options(read_options_file(r))


def test_demo_parser() -> None:
    args = parser().parse_args(["demo", "--archs", "gdn,transformer", "--examples", "8"])
    assert args.func.__name__ == "run_demo" and args.examples == 8 and args.train is False
