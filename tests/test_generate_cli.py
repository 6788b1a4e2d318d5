"""`hlsa generate` streams a greedy continuation from a saved checkpoint with a local tokenizer."""

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hlsa.cli import main
from hlsa.tokenizer import byte_tokenizer
from tests.model.conftest import tiny_model


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model("gdn_lte")
    model.save_pretrained(tmp_path / "ckpt")
    byte_tokenizer().save_pretrained(tmp_path / "tok")
    return model, tmp_path


def test_generate_streams_the_greedy_continuation(checkpoint, capsys):
    model, root = checkpoint
    rc = main(["generate", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--prompt", "hello",
               "--max-new-tokens", "6", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    tok = byte_tokenizer()
    ids = tok("hello", return_tensors="pt").input_ids
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.startswith("hello")
    assert tok.decode(expected[0]) in printed


def usage_error(capsys, argv: list[str], pattern: str) -> None:
    """`hlsa` reports bad input as one line, `hlsa: error: ...`, with exit status 2."""
    capsys.readouterr()  # what setting up the test printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlsa: error: ") and re.search(pattern, err) and "Traceback" not in err, err


def test_generate_rejects_a_directory_without_checkpoint(tmp_path, capsys):
    usage_error(capsys, ["generate", str(tmp_path), "--prompt", "x"], "not a checkpoint directory")


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "checkpoints" / "demo").iterdir())


@pytest.mark.parametrize("ckpt", SHIPPED, ids=lambda p: p.name)
def test_generate_runs_on_every_shipped_checkpoint(ckpt, capsys):
    """The demo models carry their MQAR tokenizer: a key seen with its value is answered in task symbols."""
    argv = ["generate", str(ckpt), "--prompt", "k5 v9 f1 f2 f3 k5", "--max-new-tokens", "3", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out.split()
    assert out[:6] == ["k5", "v9", "f1", "f2", "f3", "k5"] and len(out) == 9
    assert all(re.fullmatch(r"[kvf]\d+", word) for word in out)


def test_generate_refuses_words_outside_a_task_vocabulary(capsys):
    usage_error(capsys, ["generate", str(SHIPPED[0]), "--prompt", "hello k1"], r"outside the tokenizer's vocabulary")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bogus", r"device 'bogus' is not a device name; use cpu, cuda or cuda:N"),
        ("meta", r"device 'meta': hlsa runs models on cpu or cuda"),
        pytest.param(
            "cuda",
            r"no CUDA device is visible on this machine; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_generate_refuses_a_device_this_machine_lacks(checkpoint, capsys, device, message):
    _, root = checkpoint
    usage_error(capsys, ["generate", str(root / "ckpt"), "--prompt", "hi", "--device", device], message)


def test_generate_refuses_a_prompt_that_is_not_utf8(checkpoint, capsys, monkeypatch):
    _, root = checkpoint
    # Undecodable command-line bytes reach Python as lone surrogates (PEP 383).
    usage_error(capsys, ["generate", str(root / "ckpt"), "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape"),
                         "--device", "cpu"], r"--prompt is not UTF-8 text")  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xff\xfe bytes")))
    usage_error(capsys, ["generate", str(root / "ckpt"), "--prompt", "-", "--device", "cpu"],
                r"standard input is not UTF-8 text \(byte 3")  # fmt: skip


def test_generate_reads_the_prompt_from_stdin(checkpoint, capsys, monkeypatch):
    _, root = checkpoint
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("héllo".encode())))
    assert main(["generate", str(root / "ckpt"), "--prompt", "-", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("héllo")


def test_generate_help_lists_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "hlsa.cli", "generate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "(default: 64)" in out and "--allow-partial-weights" in out


def test_generate_accepts_the_byte_tokenizer_by_name(checkpoint, capsys):
    _, root = checkpoint
    argv = ["generate", str(root / "ckpt"), "--tokenizer", "byte", "--prompt", "hello", "--max-new-tokens", "3"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_generate_samples_with_valid_flags(checkpoint, capsys):
    _, root = checkpoint
    argv = ["generate", str(root / "ckpt"), "--prompt", "hello", "--max-new-tokens", "3", "--device", "cpu"]
    assert main([*argv, "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out.startswith("hello")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], r"--temperature must be a finite number >= 0"),
        (["--temperature", "nan"], r"--temperature must be a finite number >= 0"),
        (["--temperature", "inf"], r"--temperature must be a finite number >= 0"),
        (["--max-new-tokens", "0"], r"--max-new-tokens must be >= 1"),
        (["--temperature", "0.7", "--top-k", "0"], r"--top-k must be >= 1"),
        (["--temperature", "0.7", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
        (["--temperature", "0.7", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
        (["--top-k", "5"], r"pass --temperature > 0 to sample"),
        (["--top-p", "0.9"], r"pass --temperature > 0 to sample"),
    ],
)
def test_generate_rejects_bad_sampling_flags(checkpoint, capsys, flags, message):
    _, root = checkpoint
    argv = ["generate", str(root / "ckpt"), "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu", *flags]
    usage_error(capsys, argv, message)


def test_generate_refuses_a_tokenizer_larger_than_the_model_vocabulary(tmp_path, capsys):
    """The byte tokenizer (259 ids) next to a 200-token model: ids 200..258 would index past the embeddings."""
    tiny_model("gdn_lte", vocab_size=200).save_pretrained(tmp_path / "ckpt")
    byte_tokenizer().save_pretrained(tmp_path / "ckpt")
    argv = ["generate", str(tmp_path / "ckpt"), "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu"]
    usage_error(capsys, argv, r"259 tokens .* vocab_size 200; pass --tokenizer DIR with the tokenizer")
