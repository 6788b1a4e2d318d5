"""Evaluate the real-text runs (benchmarks/text_runs.py) on the held-out split: perplexity by token position, needle
and passkey retrieval at 1K-8K tokens, and decode-cache bytes per sequence, for every run and seed.

Each run is a model directory (`from_pretrained`, with its tokenizer): `RUNS` holds `<arch>-s<seed>/model` (the
unpacked tars of `text_runs.py train --pack`) or `<arch>-s<seed>/export` (a run folder). Everything goes through the
library's evaluation code: `hlsa.eval.ppl.perplexity_by_position` (64-token buckets, summed into the coarse ones
below), `hlsa.eval.niah` (RULER's `niah_single_1`, a number in repeated noise: the passkey test; and
`niah_single_2`, a number in an essay), `hlsa.demo.cache_bytes` (the cache after a prefill) and, for GDN+LTE,
`hlsa.eval.inspect` (what each head keeps of a passkey prompt of the shortest length, the needle marked). The results
JSON (`benchmarks/results/text-<where>.json`) records the commit, machine, versions and command; per architecture it
gives the mean, min and max over seeds, and a PNG beside it plots them (eviction pictures: `...-inspect-<run>.png`).

    PYTHONPATH=src python benchmarks/text_eval.py --runs runs/text-h100 --corpus runs/corpus --where h100

Cost on 2 shared CPU cores: one 8K-token forward of the GDN+LTE model takes about 5 s and under 1 GB (the PyTorch
attention runs in blocks of queries); `--device cuda` is the faster way.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from benchlib import machine
from text_runs import model_dir

ROOT = Path(__file__).resolve().parents[1]
FINE = 64  # tokens per perplexity bucket as computed; the reported buckets are sums of these
EDGES = (0, 64, 256, 1024, 2048, 4096, 8192)  # reported perplexity buckets: [EDGES[i], EDGES[i + 1])
LENGTHS = (1024, 2048, 4096, 8192)
TASKS = {"passkey": "niah_single_1", "needle": "niah_single_2"}


def find_runs(root: Path) -> dict[str, Path]:
    """`{<arch>-s<seed>: model dir}` under `root`: `<name>/model` (a pack), else a run folder's export or, for a run
    stopped by its time limit, its latest checkpoint."""
    runs = {}
    for d in sorted(p for p in root.iterdir() if re.fullmatch(r"[a-z0-9_]+-s\d+", p.name)):
        found = model_dir(d)
        if found is not None:
            runs[d.name] = found
    if not runs:
        raise SystemExit(f"{root}: no <arch>-s<seed>/model folders or run folders with a checkpoint")
    return runs


def collect_runs(folders: Iterable[Path]) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """The runs of several folders (`find_runs`; a later folder's run of a name replaces an earlier one's) and where
    each trained: the `summary.json` of the folder's pack, when it has one, gives steps, loss, time, GPU and commit."""
    runs: dict[str, Path] = {}
    trained: dict[str, dict[str, Any]] = {}
    for folder in folders:
        found = find_runs(folder)
        runs.update(found)
        for name in found:
            trained.pop(name, None)
        summary_path = folder / "summary.json"
        if summary_path.is_file():
            s = json.loads(summary_path.read_text())
            trained.update({k: {**{f: v.get(f) for f in ("steps", "last_ce", "exit_status", "wall_s", "weights")},
                                "device": s["machine"].get("gpu") or "cpu", "commit": s["machine"].get("commit")}
                            for k, v in s["runs"].items() if k in found})  # fmt: skip
    return runs, trained


def evaluate_run(
    model_path: Path, validation: Path, *, device: str, ppl_docs: int, block: int, lengths: tuple[int, ...],
    samples: int, depths: tuple[float, ...], batch_size: int, picture: Path | None = None,
    cache: dict[str, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One run's numbers; `picture`: where to draw the eviction picture of a passkey prompt (LTE models only);
    `cache`: the cache bytes per length when already measured (they depend on the architecture, not the seed)."""
    from hlsa.demo import cache_bytes
    from hlsa.eval import inspect, niah
    from hlsa.eval.ppl import coarse_buckets, iter_documents, perplexity_by_position
    from hlsa.loading import load_model, load_tokenizer

    model = load_model(model_path, device=torch.device(device), dtype="float32")
    tok = load_tokenizer(model_path, None)
    t0 = time.perf_counter()
    ppl = perplexity_by_position(
        model, tok, iter_documents(str(validation)), block_size=block, bucket_size=FINE, max_documents=ppl_docs,
        min_tokens=FINE, progress=False,
    )  # fmt: skip
    result: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "ppl": {
            "buckets": coarse_buckets(ppl["buckets"], EDGES),
            "overall": ppl["overall"],
            "documents": ppl["documents"],
        },
        "seconds": {"ppl": round(time.perf_counter() - t0, 1)},
    }
    for name, task in TASKS.items():
        t0 = time.perf_counter()
        cells = niah.make_samples([task], tokenizer=tok, lengths=lengths, depths=depths, num_samples=samples,
                                  tokens_to_generate=16, progress=False)  # fmt: skip
        preds = niah.generate_predictions(model, tok, [s.prompt for s in cells], batch_size=batch_size,
                                          max_new_tokens=16, progress=False)  # fmt: skip
        records = niah.score_samples(cells, preds)
        result[name] = {
            str(n): sum(r["exact"] for r in records if r["max_length"] == n) / max(1, len(depths) * samples)
            for n in lengths
        }
        result["seconds"][name] = round(time.perf_counter() - t0, 1)
        if name == "passkey" and picture is not None and "lte" in model.config.mixers:
            sample = cells[len(depths) // 2 * samples]  # the shortest length, the middle depth
            ins = inspect.inspect_prompt(model, tok, sample.prompt, needle=(sample.needle_start, sample.needle_end))
            inspect.render(ins, str(picture), title=f"{model_path.parent.name}: passkey at {sample.max_length} tokens")
            result["kept_at_end"] = ins.kept
    result["cache_bytes"] = cache or {str(n): cache_bytes(model, n) for n in lengths}
    return result


def aggregate(per_run: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per architecture: mean, min and max over seeds of every number (perplexity per bucket, accuracy and cache
    bytes per length)."""
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for name, r in per_run.items():
        by_arch.setdefault(name.rsplit("-s", 1)[0], []).append(r)

    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    out = {}
    for arch, rs in by_arch.items():
        starts = sorted({b["start"] for r in rs for b in r["ppl"]["buckets"]})
        ppl = {}
        for s in starts:
            vals = [b["ppl"] for r in rs for b in r["ppl"]["buckets"] if b["start"] == s]
            if len(vals) == len(rs):  # a bucket every seed reached
                ppl[str(s)] = stats(vals)
        out[arch] = {
            "seeds": len(rs),
            "ppl": ppl,
            "ppl_overall": stats([r["ppl"]["overall"]["ppl"] for r in rs]),
            **{k: {n: stats([r[k][n] for r in rs]) for n in rs[0][k]} for k in (*TASKS, "cache_bytes")},
        }
    return out


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Perplexity by position, passkey and needle accuracy by length, cache bytes by length: mean and range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ppl", "perplexity by token position", "position (bucket start)"),
              ("passkey", "passkey accuracy", "length"), ("needle", "needle accuracy", "length"),
              ("cache_bytes", "decode cache bytes / sequence", "length")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title, xlabel) in zip(axes, panels):
        for arch, s in summary.items():
            xs = sorted(s[key], key=int)
            mean = [s[key][x]["mean"] for x in xs]
            ax.plot([int(x) for x in xs], mean, marker="o", label=f"{arch} ({s['seeds']})")
            ax.fill_between([int(x) for x in xs], [s[key][x]["min"] for x in xs], [s[key][x]["max"] for x in xs],
                            alpha=0.2)  # fmt: skip
        ax.set_xscale("symlog" if key == "ppl" else "log", base=2)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
    axes[0].set_yscale("log")
    axes[-1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--runs",
        required=True,
        nargs="+",
        help="folders of <arch>-s<seed>/model (or /export) "
        "folders, each with its pack's summary.json when it has one (a later folder's run of a name wins)",
    )
    p.add_argument("--corpus", default="runs/corpus", help="the corpus folder (its validation.jsonl is used)")
    p.add_argument("--where", required=True, help="where the runs were trained, e.g. h100 or cpu (names the file)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/text-<where>.json)")
    p.add_argument("--only", default=None, help="evaluate only these runs (comma-separated names)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ppl-docs", type=int, default=8, help="validation documents for the perplexity")
    p.add_argument("--block", type=int, default=8192, help="tokens of each document scored (past training's 2048)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="passkey / needle / cache lengths")
    p.add_argument("--samples", type=int, default=1, help="samples per length and depth")
    p.add_argument("--depths", default="10,50,90", help="needle depths in percent")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded at once")
    args = p.parse_args(argv)
    runs, trained = collect_runs(map(Path, args.runs))
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    out = Path(args.out or ROOT / f"benchmarks/results/text-{args.where}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    depths = tuple(float(x) for x in args.depths.split(","))
    payload = {
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(["text_eval.py", *argv]),
        "trained_on": args.where, "evaluated_on": machine(), "device": args.device,
        "settings": {"ppl_docs": args.ppl_docs, "block": args.block, "buckets": EDGES, "lengths": lengths,
                     "samples": args.samples, "depths": depths, "tasks": TASKS},
        "summary": {}, "runs": {},
    }  # fmt: skip
    per_run: dict[str, dict[str, Any]] = payload["runs"]
    caches: dict[str, dict[str, int]] = {}
    for name, found in runs.items():
        t0 = time.perf_counter()
        per_run[name] = evaluate_run(
            found, Path(args.corpus) / "validation.jsonl", device=args.device, ppl_docs=args.ppl_docs,
            block=args.block, lengths=lengths, samples=args.samples, depths=depths, batch_size=args.batch_size,
            picture=out.with_name(f"{out.stem}-inspect-{name}.png"), cache=caches.get(name.rsplit("-s", 1)[0]),
        )  # fmt: skip
        caches[name.rsplit("-s", 1)[0]] = per_run[name]["cache_bytes"]
        per_run[name]["trained"] = trained.get(name, {})
        per_run[name]["model"] = found.name  # `model` (a pack), `export` or the step of a stopped run
        r = per_run[name]
        print(f"{name}: ppl {r['ppl']['overall']['ppl']:.2f}, passkey {r['passkey']}, needle {r['needle']}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        # written after every run, so that a stopped evaluation keeps what it finished
        payload["summary"] = summary = aggregate(per_run)
        out.write_text(json.dumps(payload, indent=1) + "\n")
    plot(summary, out.with_suffix(".png"))
    print(out, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
