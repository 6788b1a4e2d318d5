"""Perplexity by position: bucket bookkeeping, agreement with the model's own loss, document sources, the CLI."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest
import torch

from hlsa.eval.haystack import essay_sentences
from hlsa.eval.ppl import coarse_buckets, iter_documents, perplexity_by_position, token_nll


def _doc(seed: int, sentences: int = 12) -> str:
    return " ".join(essay_sentences(sentences, random.Random(seed)))


def _load(path: Path):  # noqa: ANN202
    from hlsa.loading import load_model, load_tokenizer

    return load_model(path, device=torch.device("cpu")), load_tokenizer(path, None)


def test_coarse_buckets_weight_fine_buckets_by_tokens() -> None:
    fine = [{"start": 0, "end": 64, "tokens": 10, "nll": 1.0}, {"start": 64, "end": 128, "tokens": 30, "nll": 2.0},
            {"start": 128, "end": 192, "tokens": 20, "nll": 4.0}]  # fmt: skip
    out = coarse_buckets(fine, (0, 64, 256, 1024))
    assert [(b["start"], b["end"], b["tokens"]) for b in out] == [(0, 64, 10), (64, 256, 50)]
    assert math.isclose(out[1]["nll"], (30 * 2.0 + 20 * 4.0) / 50) and math.isclose(out[1]["ppl"], math.exp(2.8))


def test_chunked_nll_matches_model_loss(tiny_lte_dir: Path) -> None:
    model, tok = _load(tiny_lte_dir)
    ids = torch.tensor(tok(_doc(0))["input_ids"][:300])
    nll = token_nll(model, ids, chunk=64)  # several chunks, the last one partial
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert nll.shape == (ids.shape[0] - 1,)
    torch.testing.assert_close(nll.mean(), loss.float(), rtol=1e-5, atol=1e-5)


def test_buckets(tiny_lte_dir: Path) -> None:
    model, tok = _load(tiny_lte_dir)
    docs = [_doc(1), _doc(2), "too short"]
    result = perplexity_by_position(
        model, tok, iter(docs), block_size=250, bucket_size=100, min_tokens=50, progress=False
    )
    assert result["documents"] == 2 and result["skipped"] == 1
    assert [(b["start"], b["end"], b["tokens"]) for b in result["buckets"]] == [
        (0, 100, 2 * 99), (100, 200, 2 * 100), (200, 250, 2 * 50),
    ]  # fmt: skip
    # The overall NLL is the token-weighted mean of the buckets, and ppl = exp(nll).
    total = sum(b["nll"] * b["tokens"] for b in result["buckets"]) / sum(b["tokens"] for b in result["buckets"])
    assert math.isclose(result["overall"]["nll"], total, rel_tol=1e-9)
    assert all(math.isclose(b["ppl"], math.exp(b["nll"])) for b in result["buckets"])
    # Independent check of bucket 0 of the first document alone.
    ids = torch.tensor(tok(docs[0])["input_ids"][:250])
    single = perplexity_by_position(model, tok, iter(docs[:1]), block_size=250, bucket_size=100, progress=False)
    assert math.isclose(single["buckets"][0]["nll"], token_nll(model, ids)[:99].mean().item(), rel_tol=1e-5)


def test_document_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    assert list(iter_documents(str(tmp_path))) == ["first", "second"]
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["first"]
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"body": "x"}) + "\n\n" + json.dumps({"body": "y"}) + "\n")
    assert list(iter_documents(str(jl), text_field="body")) == ["x", "y"]
    with pytest.raises(ValueError, match="--text-field"):
        list(iter_documents(str(jl)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        list(iter_documents(str(empty)))
    with pytest.raises(ValueError, match="existing"):
        list(iter_documents(str(tmp_path / "typo.txt")))


def test_ppl_command(tiny_lte_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hlsa.eval.cli import register

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": _doc(s)}) + "\n" for s in range(3)))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", str(tiny_lte_dir), "--data", str(data), "--block-size", "200", "--bucket-size", "64"]
    args = parser.parse_args([*argv, "--max-documents", "2", "--out", str(out)])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["documents"] == 2 and len(result["buckets"]) == 4 and result["bucket_size"] == 64
    assert "all" in capsys.readouterr().out
