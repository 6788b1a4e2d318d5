"""`hlsa generate` streams a greedy continuation from a saved checkpoint with a local tokenizer."""

import re

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
        (["--temperature", "-1"], r"--temperature must be >= 0"),
        (["--temperature", "nan"], r"--temperature must be >= 0"),
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
