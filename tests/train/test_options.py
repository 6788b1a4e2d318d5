"""Options files, command-line overrides and the `hlsa train` parser."""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import pytest

from hlsa.cli import main
from hlsa.train.cli import collect_overrides, register
from hlsa.train.options import Options, build_options, read_options_file

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hlsa")
    register(p.add_subparsers(dest="command"))
    return p


def test_precedence_defaults_file_cli(tmp_path: Path) -> None:
    f = tmp_path / "o.toml"
    f.write_text('[optim]\nlr = 1e-3\nwarmup_steps = 7\n[data]\nsource = "synthetic:mqar"\n')
    args = parser().parse_args(["train", "--options", str(f), "--optim.lr", "2e-3", "--steps", "50", "--resume"])
    opts = build_options(read_options_file(args.options), collect_overrides(args))
    assert opts.optim.lr == 2e-3 and opts.optim.warmup_steps == 7  # CLI beats file, file beats default
    assert opts.optim.eps == 1e-15 and opts.optim.clip == 1.0  # the authors' recipe defaults
    assert opts.train.steps == 50 and opts.checkpoint.resume is True and opts.data.source == "synthetic:mqar"


def test_yaml_and_types(tmp_path: Path) -> None:
    f = tmp_path / "o.yaml"
    f.write_text("train:\n  steps: 3\n  skip_nan_inf: false\noptim:\n  lr: 1\n  warmup_steps: 1\n")
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
    assert build_options({"demo": {"layers": 2}, "train": {"steps": 600}}).train.steps == 600
    with pytest.raises(ValueError, match=r"^train\.steps: expected int, got 1\.5$"):
        build_options({"train": {"steps": 1.5}})
    with pytest.raises(ValueError, match=r"nope\.toml: no such file \(the options file\); pass an existing \.toml"):
        read_options_file(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="is a directory or special file, not the options file"):
        read_options_file(tmp_path)
    (tmp_path / "o.ini").write_text("")
    with pytest.raises(ValueError, match="suffix"):
        read_options_file(tmp_path / "o.ini")


def test_committed_recipes_parse() -> None:
    recipes = sorted((REPO / "configs" / "train").glob("*.toml"))
    assert {r.stem for r in recipes} >= {"demo", "gdn_lte_0.4B", "gdn_lte_1.4B"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # they validate, and their warm-up ends before their last step
        for r in recipes:
            build_options(read_options_file(r))


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("train.steps", 0, ">= 1"),
        ("data.batch_size", 0, ">= 1"),
        ("optim.grad_accum", 0, ">= 1"),
        ("data.seq_len", 1, ">= 2"),
        ("checkpoint.interval", -1, ">= 0"),
        ("checkpoint.keep", 0, ">= 1"),  # the newest checkpoint is never deleted: 0 would silently mean 1
        ("optim.lr", 0.0, "a finite number > 0"),
        ("optim.lr", float("nan"), "a finite number"),
        ("optim.lr", float("inf"), "a finite number"),
        ("optim.clip", float("nan"), "a finite number"),  # NaN > 0 is false: it silently disabled clipping
        ("optim.clip", -1.0, ">= 0"),
        ("optim.eps", float("-inf"), "a finite number"),
        ("optim.beta1", float("nan"), "a finite number"),
        ("optim.min_lr_ratio", float("nan"), "a finite number"),
        ("optim.weight_decay", float("inf"), "a finite number"),
        ("train.max_consecutive_skips", -1, ">= 0"),
        ("data.task_vocab", 0, ">= 1"),
        ("optim.min_lr_ratio", 1.5, r"in \[0, 1\]"),
        ("optim.min_lr_ratio", -0.1, r"in \[0, 1\]"),
        ("optim.warmup_steps", -1, ">= 0"),
        ("optim.beta1", 1.0, r"in \[0, 1\)"),
        ("optim.beta2", -0.5, r"in \[0, 1\)"),
        ("optim.eps", 0.0, "a finite number > 0"),
        ("optim.weight_decay", -0.1, "a finite number >= 0"),
        ("train.dtype", "fp16", "one of auto, bf16, fp32"),
        ("train.device", "gpu", "one of auto, cpu, cuda"),
        ("train.parallel", "fsdp", "one of ddp, fsdp2"),
        ("train.threads", -1, ">= 0"),
        ("train.log_every", 0, ">= 1"),
        ("train.seed", -1, ">= 0"),
        ("data.num_pairs", 0, ">= 1"),
        ("data.num_queries", 0, ">= 1"),
        ("data.passkey_digits", 0, ">= 1"),
    ],
)
def test_out_of_range_values_are_refused(key: str, value: object, accepted: str) -> None:
    """The message names the option, the value and the accepted range, for file values and flags alike."""
    section, _, name = key.partition(".")
    pattern = rf"^{re.escape(f'{key} = {value!r}')} is invalid: it must be {accepted}"
    with pytest.raises(ValueError, match=pattern):
        build_options(overrides={key: value})
    with pytest.raises(ValueError, match=pattern):
        build_options({section: {name: value}})


def test_range_edges_are_accepted_and_every_problem_is_listed() -> None:
    edges = {"optim.warmup_steps": 0, "checkpoint.interval": 0, "optim.min_lr_ratio": 1, "optim.beta1": 0}
    edges |= {"data.seq_len": 2, "train.steps": 1, "train.threads": 0, "train.dtype": "bf16", "train.parallel": "fsdp2"}
    opts = build_options(overrides=edges)
    assert opts.optim.min_lr_ratio == 1.0 and opts.data.seq_len == 2 and opts.train.dtype == "bf16"
    with pytest.raises(ValueError, match=r"^data\.batch_size = 0 .*; optim\.grad_accum = 0 "):
        build_options(overrides={"optim.grad_accum": "0", "data.batch_size": "0"})


def test_warmup_longer_than_the_run_warns() -> None:
    with pytest.warns(UserWarning, match=r"optim\.warmup_steps \(512\) >= train\.steps \(200\)"):
        build_options(overrides={"train.steps": 200})  # docs/training.md's first example, default warm-up
    with pytest.warns(UserWarning, match=r"optim\.warmup_steps \(7\) >= train\.steps \(7\)"):
        build_options(overrides={"train.steps": 7, "optim.warmup_steps": 7})  # peaks on the last step, never decays
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_options(overrides={"train.steps": 8, "optim.warmup_steps": 7})


def test_unparsable_values_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^optim\.lr: expected float, got 'abc'$"):
        build_options(overrides={"optim.lr": "abc"})
    with pytest.raises(ValueError, match=r"^train\.steps: expected int, got '1e3'$"):
        build_options(overrides={"train.steps": "1e3"})
    with pytest.raises(ValueError, match=r"^train\.skip_nan_inf: expected a boolean \(true/false\), got 'maybe'$"):
        build_options(overrides={"train.skip_nan_inf": "maybe"})
    f = tmp_path / "o.yaml"
    f.write_text("optim:\n  lr: fast\n")  # YAML gives strings for what it cannot read as numbers
    with pytest.raises(ValueError, match=r"^optim\.lr: expected float, got 'fast'$"):
        build_options(read_options_file(f))


def test_malformed_options_files_name_the_file(tmp_path: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[optim]\nlr = \n")
    with pytest.raises(ValueError, match="options file .*bad.toml"):
        read_options_file(bad_toml)
    listing = tmp_path / "list.yaml"
    listing.write_text("- optim\n- train\n")
    with pytest.raises(ValueError, match="options file .*list.yaml.* must hold a mapping"):
        read_options_file(listing)


def test_hlsa_reports_bad_options_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", "synthetic:mqar", "--out", str(run), "--train.device", "cpu", "--log.progress", "false"]
    assert main([*argv, "--optim.grad_accum", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlsa: error: optim.grad_accum = 0 is invalid: it must be >= 1") and "Traceback" not in err
    assert main([*argv, "--optim.lr", "abc"]) == 2
    assert capsys.readouterr().err == "hlsa: error: optim.lr: expected float, got 'abc'\n"
    assert not run.exists()  # refused before anything was built
    # Bad input found later (here: no model config) is a usage error too; errors of hlsa's own code keep tracebacks.
    assert main([*argv, "--train.steps", "1", "--optim.warmup_steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("hlsa: error: model.config is empty; pass --config PATH")
    from hlsa.train import trainer

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(trainer, "load_config", broken)
    with pytest.raises(ValueError, match="a bug"):
        main([*argv, "--config", "any.json", "--train.steps", "1", "--optim.warmup_steps", "0"])


def test_types_are_checked_for_options_built_in_code() -> None:
    """`Options(...)` skips `build_options`' parsing: validate still refuses a bool for a count, a string for a
    number, and NaN, naming every option."""
    from hlsa.train.options import DataOptions, OptimOptions, TrainOptions

    opts = Options(
        data=DataOptions(batch_size=True, seq_len=8.0),  # type: ignore[arg-type]
        optim=OptimOptions(clip=float("nan"), lr="1e-3", eps=1),  # type: ignore[arg-type]
        train=TrainOptions(skip_nan_inf=1),  # type: ignore[arg-type]
    )
    with pytest.raises(ValueError) as e:
        opts.validate()
    msg = str(e.value)
    for part in (
        "data.seq_len = 8.0 is invalid: it must be an integer",
        "data.batch_size = True is invalid: it must be an integer",
        "optim.lr = '1e-3' is invalid: it must be a finite number",
        "optim.clip = nan is invalid: it must be a finite number",
        "train.skip_nan_inf = 1 is invalid: it must be true or false",
    ):
        assert part in msg
    assert "optim.eps" not in msg  # an int where a float belongs is fine


@pytest.mark.parametrize("flag", ["--optim.clip=nan", "--optim.lr=inf", "--optim.beta2=-inf", "--optim.eps=NaN"])
def test_non_finite_flags_are_refused(flag: str) -> None:
    args = parser().parse_args(["train", flag])
    with pytest.raises(ValueError, match=f"{flag[2:].split('=')[0]} = .* is invalid: it must be a finite number"):
        build_options(overrides=collect_overrides(args))


def test_an_unreadable_options_file_is_reported_as_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "o.toml"
    path.write_text("[optim]\nlr = 1e-3\n")

    def denied(self: Path, *args: object, **kwargs: object) -> None:  # chmod 000 does not stop root
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ValueError, match="o.toml exists but is not readable .*read access to the options file"):
        read_options_file(path)
