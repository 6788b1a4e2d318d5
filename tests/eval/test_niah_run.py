"""`hlsa eval niah` on a tiny model: the run writes the summary and shows progress, batching does not change
predictions, export works; the eval commands refuse a tokenizer larger than the model's vocabulary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch


def _parser() -> argparse.ArgumentParser:
    from hlsa.eval.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser


def test_niah_command(tiny_swa_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "niah.json"
    argv = ["eval", "niah", str(tiny_swa_dir), "--tasks", "niah_single_1,niah_multikey_2", "--lengths", "480"]
    argv += ["--depths", "0,100", "--samples", "1", "--tokens-to-generate", "5", "--batch-size", "4", "--out", str(out)]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert len(result["records"]) == 2 * 2
    cell = result["summary"]["niah_multikey_2"]["480"]["100"]
    assert set(cell) == {"partial", "exact", "n"} and cell["n"] == 1
    captured = capsys.readouterr()
    assert "niah_single_1" in captured.out
    # Progress goes to stderr (stdout keeps only the table): 4 samples built, then one batch of 4 generated.
    assert "niah samples" in captured.err and "4/4" in captured.err
    assert "niah generate" in captured.err and "1/1" in captured.err


def test_batched_generation_equals_single(tiny_lte_dir: Path) -> None:
    """Left-padded batches through LTE prefill + decode (short prompts: window 8 and buffer 6 still evict)."""
    from hlsa.eval.niah import generate_predictions
    from hlsa.loading import load_model, load_tokenizer

    model, tok = load_model(tiny_lte_dir, device=torch.device("cpu")), load_tokenizer(tiny_lte_dir, None)
    prompts = ["The code is 4417. " * k + "What is the code?" for k in (1, 3, 4, 6)] + ["Hi"]
    single = generate_predictions(model, tok, prompts, batch_size=1, max_new_tokens=6)
    batched = generate_predictions(model, tok, prompts, batch_size=4, max_new_tokens=6)
    assert batched == single
    assert tok.padding_side == "left"


def test_export_lm_eval(tiny_lte_dir: Path, tmp_path: Path) -> None:
    argv = ["eval", "niah", str(tiny_lte_dir), "--tasks", "niah_single_3", "--lengths", "560", "--depths", "50"]
    argv += ["--samples", "2", "--tokens-to-generate", "16", "--export-lm-eval", str(tmp_path / "tasks")]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "hlsa_niah_single_3.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["all_lengths"] == [560] and rows[0]["outputs"][0] in rows[0]["input"]
    yaml_text = (tmp_path / "tasks" / "hlsa_niah_single_3.yaml").read_text()
    assert "task: hlsa_niah_single_3" in yaml_text and 'metric: "560"' in yaml_text
    assert (tmp_path / "tasks" / "hlsa_niah_utils.py").is_file()


@pytest.mark.parametrize("command", ["niah", "ppl", "inspect"])
def test_tokenizer_larger_than_the_vocabulary_is_refused(command: str, tmp_path: Path) -> None:
    """A 200-token model saved with the byte tokenizer (259 ids): every eval command stops before running it."""
    from hlsa.config import HybridConfig
    from hlsa.model import HybridForCausalLM
    from hlsa.tokenizer import byte_tokenizer
    from tests.eval.conftest import TINY_CONFIGS

    fields = {k: v for k, v in json.loads((TINY_CONFIGS / "gdn_swa.json").read_text()).items() if k != "model_type"}
    fields.update(vocab_size=200, backend="torch")
    ckpt = tmp_path / "ckpt"
    HybridForCausalLM(HybridConfig(**fields)).save_pretrained(ckpt)
    byte_tokenizer().save_pretrained(ckpt)
    (tmp_path / "doc.txt").write_text("hello world " * 20)
    extra = {
        "niah": ["--tasks", "niah_single_1", "--lengths", "480", "--depths", "50", "--samples", "1"],
        "ppl": ["--data", str(tmp_path / "doc.txt"), "--block-size", "64", "--bucket-size", "32"],
        "inspect": ["--prompt", "hello world", "--out", str(tmp_path / "x.png")],
    }[command]
    args = _parser().parse_args(["eval", command, str(ckpt), "--device", "cpu", *extra])
    with pytest.raises(ValueError, match=r"259 tokens .* vocab_size 200; pass --tokenizer DIR with the tokenizer"):
        args.func(args)


def test_a_bad_checkpoint_path_is_one_line(tmp_path, capsys) -> None:
    """`hlsa eval` reports bad input as `hlsa: error: ...` with status 2, not a traceback."""
    from hlsa.cli import main

    assert main(["eval", "ppl", str(tmp_path / "missing"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlsa: error: model ") and "no such directory" in err and "Traceback" not in err
