"""`hlsa eval niah` on a tiny model: the run writes the summary, batching does not change predictions, export works."""

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
    assert "niah_single_1" in capsys.readouterr().out


def test_batched_generation_equals_single(tiny_lte_dir: Path) -> None:
    """Left-padded batches through LTE prefill + decode (short prompts: window 8 and buffer 6 still evict)."""
    from hlsa.eval.common import load_model, load_tokenizer
    from hlsa.eval.niah import generate_predictions

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
