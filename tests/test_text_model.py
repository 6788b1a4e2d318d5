"""The shipped real-text GDN+LTE model (checkpoints/text/gdn_lte) works through the commands README shows, and its
perplexity on the shipped validation excerpt is the number README gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from hlsa.cli import main
from hlsa.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "checkpoints" / "text" / "gdn_lte"
EXCERPT = REPO / "checkpoints" / "text" / "validation-excerpt.jsonl"
PROMPT = "The Python standard library"


def test_the_shipped_files_fit_the_budget() -> None:
    assert (MODEL / "model.safetensors").is_file() and (MODEL / "tokenizer.json").is_file()
    shipped = sum(p.stat().st_size for p in MODEL.iterdir())
    assert shipped <= 25 * 2**20, shipped
    config = json.loads((MODEL / "config.json").read_text())
    assert config["mixers"] == ["gdn", "lte"] * 3


def test_generate_prints_twenty_greedy_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(MODEL), "--prompt", PROMPT, "--max-new-tokens", "20", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    model, tok = load_model(MODEL), load_tokenizer(MODEL)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=None)  # fmt: skip
    new = out[0, ids.shape[1] :]
    assert new.numel() == 20 and tok.decode(new).strip()
    assert printed.startswith(PROMPT) and tok.decode(out[0], skip_special_tokens=True).strip() in printed


def readme_perplexity() -> float:
    """The excerpt's perplexity as README states it, next to the command that measures it."""
    text = (REPO / "README.md").read_text()
    found = re.search(r"validation-excerpt\.jsonl --block-size 2048` gives perplexity ([0-9]+\.[0-9]+)", text)
    assert found, "README.md must state the shipped model's perplexity on the validation excerpt"
    return float(found.group(1))


def test_validation_perplexity_is_the_readme_number(tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", str(MODEL), "--data", str(EXCERPT), "--block-size", "2048", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["documents"] == 4 and result["overall"]["tokens"] > 7000
    assert result["overall"]["ppl"] == pytest.approx(readme_perplexity(), rel=0.01)


def test_niah_runs_at_1k(tmp_path: Path) -> None:
    out = tmp_path / "niah.json"
    argv = ["eval", "niah", str(MODEL), "--tasks", "niah_single_1", "--lengths", "1024", "--depths", "50",
            "--samples", "2", "--tokens-to-generate", "16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(out.read_text())["summary"]["niah_single_1"]["1024"]
    assert summary["n"] == 2 and 0.0 <= summary["exact"] <= 1.0
