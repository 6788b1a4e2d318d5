"""`hlsa generate` streams a greedy continuation from a saved checkpoint with a local tokenizer."""

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


def test_generate_rejects_a_directory_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        main(["generate", str(tmp_path), "--prompt", "x"])
