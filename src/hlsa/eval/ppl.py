"""Perplexity by token position over long documents (the authors' PG19 evaluation).

Each document is tokenized, cut to `block_size` tokens, and scored in one forward pass without cache (eval mode, so
LTE layers apply their inference rule). The negative log-likelihood of the token at position `p` (predicted from
positions `< p`) is added to bucket `p // bucket_size`; a bucket's perplexity is `exp(sum nll / count)`. Rising
perplexity in late buckets means the model forgets; sparse-attention variants should stay flat.

Documents come from a `.txt` file (one document), a directory of `.txt` files, a `.jsonl` file (one document per
line, field `text_field`), or a Hugging Face dataset name (streamed; `datasets` is imported only then).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hlsa.errors import UsageError, check_readable_file
from hlsa.loading import tokenize


def iter_documents(
    source: str, *, text_field: str = "text", split: str = "test", dataset_config: str | None = None
) -> Iterator[str]:
    """Yield the documents of `source` (see the module docstring for the accepted forms)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UsageError(f"data {source}: directory holds no .txt files")
        for f in files:
            yield _read_text(f)
    elif path.suffix == ".txt" and path.is_file():
        yield _read_text(path)
    elif path.suffix == ".jsonl" and path.is_file():
        check_readable_file(path, "documents")
        try:
            with path.open(encoding="utf-8") as f:  # streamed: a JSONL corpus may not fit in memory
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield _jsonl_text(line, f"data {source}:{n}", text_field)
        except UnicodeDecodeError as e:
            raise UsageError(f"data {source}: not UTF-8 text ({e.reason}); convert it to UTF-8") from None
    elif path.exists() or path.suffix in (".txt", ".jsonl", ".json"):
        raise UsageError(f"data {source}: expected an existing .txt file, .jsonl file or directory of .txt files")
    else:
        import datasets  # lazy: only for hub datasets

        for record in datasets.load_dataset(source, dataset_config, split=split, streaming=True):
            yield record[text_field]


def _read_text(path: Path) -> str:
    check_readable_file(path, "documents")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data {path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None


def _jsonl_text(line: str, where: str, text_field: str) -> str:
    """The document of one JSONL line; `where` (file:line) names it in errors."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
    if not isinstance(record, dict) or text_field not in record:
        raise UsageError(f"{where}: no field {text_field!r} in this record (set --text-field)")
    if not isinstance(record[text_field], str):
        kind = type(record[text_field]).__name__
        raise UsageError(f"{where}: field {text_field!r} is {kind}, not text; fix or remove the line")
    return record[text_field]


@torch.no_grad()
def token_nll(model: torch.nn.Module, ids: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Per-token NLL of one sequence.

    Args:
        model: an hlsa `HybridForCausalLM` (its decoder `model.model` and `model.lm_head` are used so that logits
            are materialised `chunk` positions at a time, not `[T, vocab]` at once).
        ids: int64 `[T]`, `T >= 2`.

    Returns:
        float32 `[T - 1]`: entry `p - 1` is the NLL of token `p` given tokens `< p`.
    """
    hidden, _ = model.model(ids[None], pad_mask=None, cache=None)  # [1, T, d]
    out = []
    for s in range(0, ids.shape[0] - 1, chunk):
        e = min(s + chunk, ids.shape[0] - 1)
        logits = model.lm_head(hidden[0, s:e]).float()
        out.append(F.cross_entropy(logits, ids[s + 1 : e + 1], reduction="none"))
    return torch.cat(out)


def perplexity_by_position(
    model: torch.nn.Module,
    tokenizer: Any,
    documents: Iterator[str],
    *,
    block_size: int = 28672,
    bucket_size: int = 2048,
    max_documents: int | None = None,
    min_tokens: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Bucketed perplexity over `documents` (each cut to `block_size` tokens; shorter than `min_tokens`: skipped).

    Returns a JSON-able dict: `buckets` (list of `{start, end, tokens, nll, ppl}`), `overall`, `documents`.
    """
    if bucket_size < 1 or block_size < 2:
        raise UsageError(f"need bucket_size >= 1 and block_size >= 2 (got {bucket_size}, {block_size})")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    n_buckets = math.ceil(block_size / bucket_size)
    nll_sum = torch.zeros(n_buckets, dtype=torch.float64)
    count = torch.zeros(n_buckets, dtype=torch.float64)
    used = skipped = 0
    for text in tqdm(documents, total=max_documents, desc="ppl", unit="doc", disable=not progress):
        if max_documents is not None and used >= max_documents:
            break
        ids = torch.tensor(tokenize(tokenizer, text)["input_ids"][:block_size], dtype=torch.long)
        if ids.shape[0] < max(min_tokens, 2):
            skipped += 1
            continue
        nll = token_nll(model, ids.to(device)).double().cpu()
        bucket = torch.arange(1, ids.shape[0]) // bucket_size  # position of the predicted token
        nll_sum.index_add_(0, bucket, nll)
        count.index_add_(0, bucket, torch.ones_like(nll))
        used += 1
    if used == 0:
        raise UsageError("no document had enough tokens; lower --min-tokens or check the data")
    buckets = [
        _stats(nll_sum[b].item(), count[b].item())
        | {"start": b * bucket_size, "end": min((b + 1) * bucket_size, block_size)}
        for b in range(n_buckets)
        if count[b] > 0
    ]
    overall = _stats(nll_sum.sum().item(), count.sum().item())
    return {"documents": used, "skipped": skipped, "block_size": block_size, "bucket_size": bucket_size,
            "buckets": buckets, "overall": overall}  # fmt: skip


def coarse_buckets(fine: list[dict[str, Any]], edges: tuple[int, ...]) -> list[dict[str, Any]]:
    """Token-weighted sums of `perplexity_by_position`'s buckets into `[edges[i], edges[i + 1])` (empty ones left
    out): `{start, end, tokens, nll, ppl}`. A fine bucket counts where it lies whole, so the edges should be
    multiples of its bucket size."""
    out = []
    for lo, hi in zip(edges, edges[1:]):
        inside = [b for b in fine if lo <= b["start"] and b["end"] <= hi]
        tokens = sum(b["tokens"] for b in inside)
        if tokens:
            out.append({"start": lo, "end": hi} | _stats(sum(b["nll"] * b["tokens"] for b in inside), tokens))
    return out


def _stats(nll_sum: float, count: float) -> dict[str, float]:
    mean = nll_sum / count
    return {"tokens": int(count), "nll": mean, "ppl": math.exp(min(mean, 700.0))}


def format_table(result: dict[str, Any]) -> str:
    """Text table: one row per bucket, then the overall perplexity."""
    lines = [f"{'positions':>16} {'tokens':>10} {'nll':>9} {'ppl':>11}"]
    for b in result["buckets"]:
        lines.append(f"{b['start']:>7}-{b['end']:<8} {b['tokens']:>10} {b['nll']:>9.4f} {b['ppl']:>11.3f}")
    o = result["overall"]
    lines.append(f"{'all':>16} {o['tokens']:>10} {o['nll']:>9.4f} {o['ppl']:>11.3f}")
    return "\n".join(lines)
