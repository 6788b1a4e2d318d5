"""`hlsa eval` on the shipped demo checkpoints (the commands that fit a model of the MQAR task, and a clear refusal
from those that do not), and bad flags, inputs and outputs refused before any evaluation starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import hlsa.eval.runners
from hlsa.cli import main

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "demo"


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlsa: error: ") and re.search(pattern, err) and "Traceback" not in err, err


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusals below must come before the evaluation: reading the tokenizer or the model fails the test."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation started before the inputs were checked")

    monkeypatch.setattr(hlsa.eval.runners, "load_tokenizer", fail)
    monkeypatch.setattr(hlsa.eval.runners, "load_model", fail)


def test_ppl_and_inspect_run_on_the_shipped_checkpoints(tmp_path: Path, capsys) -> None:
    from hlsa.demo import recipe_task
    from hlsa.tokenizer import task_tokenizer
    from hlsa.train.options import read_options_file

    task = recipe_task(read_options_file(Path(__file__).resolve().parents[2] / "configs/train/demo.toml"))
    text = task_tokenizer(task).decode(task.example(7, 0).input_ids)
    (tmp_path / "mqar.txt").write_text(text)
    for arch in sorted(p.name for p in SHIPPED.iterdir()):
        argv = ["eval", "ppl", str(SHIPPED / arch), "--data", str(tmp_path / "mqar.txt"), "--device", "cpu"]
        assert (
            main([*argv, "--block-size", "256", "--bucket-size", "128", "--out", str(tmp_path / f"{arch}.json")]) == 0
        )
        assert json.loads((tmp_path / f"{arch}.json").read_text())["overall"]["tokens"] == 255
    picture = tmp_path / "lte.png"
    argv = ["eval", "inspect", str(SHIPPED / "gdn_lte"), "--prompt", text, "--needle", text.split()[40], "--out"]
    assert main([*argv, str(picture), "--device", "cpu"]) == 0
    assert picture.stat().st_size > 1000 and "retained after 256 tokens" in capsys.readouterr().out


def test_eval_commands_that_do_not_fit_a_task_model_refuse(tmp_path: Path, capsys) -> None:
    ckpt = str(SHIPPED / "gdn_lte")
    niah = ["eval", "niah", ckpt, "--lengths", "512", "--samples", "1"]
    cli_error(capsys, niah, r"niah's prompts are English text.*closed vocabulary of 256 symbols")
    cli_error(capsys, ["eval", "inspect", ckpt, "--niah", "niah_single_1"], r"--niah prompts are English text")
    cli_error(capsys, ["eval", "inspect", str(SHIPPED / "gdn_swa"), "--prompt", "k1 v1"], r"has no LTE layer")
    (tmp_path / "prose.txt").write_text("Once upon a time")
    cli_error(capsys, ["eval", "ppl", ckpt, "--data", str(tmp_path / "prose.txt"), "--device", "cpu"],
              r"outside the tokenizer's vocabulary of 256 symbols \(e\.g\. k0 k1")  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--samples", "0"], r"--samples must be >= 1, got 0"),
        (["--samples", "-1"], r"--samples must be >= 1, got -1"),
        (["--max-new-tokens", "0"], r"--max-new-tokens must be >= 1, got 0"),
        (["--max-new-tokens", "-3"], r"--max-new-tokens must be >= 1, got -3"),
        (["--tasks", "niah_single_9"], r"--tasks: unknown \['niah_single_9'\]; choose from niah_single_1"),
        (["--depths", "50,150"], r"--depths must be percentages in \[0, 100\]"),
        (["--lengths", "0"], r"--lengths must be positive"),
    ],
)
def test_niah_refuses_bad_flags(flags: list[str], message: str, capsys, no_model) -> None:
    cli_error(capsys, ["eval", "niah", str(SHIPPED / "gdn"), *flags], message)


def test_an_unwritable_out_fails_before_the_evaluation(tmp_path: Path, capsys, no_model) -> None:
    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "out.json")  # a path under a file: no user, root included, can create it
    ckpt = str(SHIPPED / "gdn_lte")
    for argv in (
        ["eval", "niah", ckpt, "--out", bad],
        ["eval", "niah", ckpt, "--export-lm-eval", str(tmp_path / "file" / "tasks")],
        ["eval", "ppl", ckpt, "--data", "doc.txt", "--out", bad],
        ["eval", "inspect", ckpt, "--prompt", "k1", "--json", bad],
        ["eval", "inspect", ckpt, "--prompt", "k1", "--out", str(tmp_path / "file" / "x.png")],
    ):
        cli_error(capsys, argv, r"file/\S+: cannot create its directory")


def test_inspect_refuses_a_missing_prompt_file_and_a_picture_name_without_an_image_suffix(tmp_path, capsys) -> None:
    ckpt = str(SHIPPED / "gdn_lte")
    missing = str(tmp_path / "nope.txt")
    cli_error(capsys, ["eval", "inspect", ckpt, "--prompt-file", missing], r"nope\.txt: no such file \(the prompt\)")
    out = str(tmp_path / "picture.txt")
    cli_error(capsys, ["eval", "inspect", ckpt, "--prompt", "k1", "--out", out], r"must end in \.png or \.svg or \.pdf")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('{"text": null}', r"bad\.jsonl:2: field 'text' is NoneType, not text"),
        ('{"text": 123}', r"bad\.jsonl:2: field 'text' is int, not text"),
        ('["text"]', r"bad\.jsonl:2: no field 'text'"),
    ],
)
def test_ppl_names_the_file_and_line_of_a_malformed_jsonl_record(tmp_path, capsys, line: str, message: str) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "k1 v1 f1 f2 k1 v1"}\n' + line + "\n")
    cli_error(capsys, ["eval", "ppl", str(SHIPPED / "gdn"), "--data", str(data), "--device", "cpu"], message)
