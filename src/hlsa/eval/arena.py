"""`hlsa eval arena`: eviction policies against each other at equal cache bytes.

Every LTE checkpoint is evaluated under each eviction policy (`hlsa.layers.eviction`) and buffer budget; a budget
`b` is the number of buffer slots beyond the sinks (`buffer_size = sink_size + b`), so at budget 0 every policy is
sinks + window: the `window` policy is evaluated there, and only there. Two within-model ceilings use a buffer that
holds every token (`buffer_size = seq_len`): `learned` (the router keeps every token it scores positive) and `oracle`
(then full causal attention in the LTE layers). A checkpoint with full-attention layers and no LTE layer (a
Transformer, GDN+attention) is evaluated as it is (its full cache, the ceiling) and under every policy but
`learned` (it has no router), its full-attention layers then keeping `ATTN_SINKS` sinks + the recipe's window +
the buffer in LTE's constant cache. A checkpoint without either (GDN+NSA, GDN+SWA, GDN) is evaluated once as it
is, as a reference. Cache bytes are those of one sequence's decode cache after a prompt of the task's length
(`HybridCache.nbytes()`); they depend on the buffer size, not on the policy (the oracle, which keeps every key, is
placed at the bytes of the cache it is compared with).

Task: `recall`, the demo's multi-query associative recall, evaluated by `hlsa.demo.evaluate` (accuracy by query
distance in units of the window). Writes a JSON file, a PNG of accuracy against cache bytes, and prints a table.
Module-level imports stay light (no torch), as in `hlsa.eval.cli`, which imports `add_arena_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TASKS = ("recall",)
# snapkv scores a prompt from its last queries and keeps nothing after it; the recall task interleaves pairs and
# queries, so it has no prompt to compress, and the arena leaves snapkv out.
ARENA_POLICIES = ("learned", "window", "random", "key_norm", "h2o", "tova", "oracle")
DEFAULT_POLICIES = ",".join(ARENA_POLICIES)
# Sinks of a full-attention layer under a policy (StreamingLLM's four); LTE layers keep their config's.
ATTN_SINKS = 4


def add_arena_parser(sub: argparse._SubParsersAction) -> None:
    """Add `arena` to the subcommands of `hlsa eval`."""
    from hlsa.cli import HelpFormatter

    p = sub.add_parser(
        "arena", help="eviction policies against each other at equal cache bytes", formatter_class=HelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="hlsa checkpoint directories")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated, of {','.join(ARENA_POLICIES)}")
    p.add_argument("--budgets", default="0,32,64,128,256", help="buffer slots beyond the sinks, comma-separated")
    p.add_argument("--tasks", default="recall", help=f"comma-separated, of {','.join(TASKS)}")
    p.add_argument("--examples", type=int, default=128, help="sequences per setting")
    p.add_argument("--recipe", default=None, help="the recipe whose [data] defines the recall task (default: demo's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="arena.json", help="JSON path; the plot goes beside it as .png")
    p.set_defaults(func=run_cli)


def _names(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    from hlsa.errors import UsageError

    names = [x for x in text.split(",") if x]
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        raise UsageError(f"{option}: unknown or empty {unknown}; choose from {','.join(allowed)}")
    return names


def _budgets(text: str) -> list[int]:
    from hlsa.errors import UsageError

    try:
        budgets = sorted({int(x) for x in text.split(",") if x})
    except ValueError as e:
        raise UsageError(f"--budgets: comma-separated integers expected; got {text!r}") from e
    if not budgets or budgets[0] < 0:
        raise UsageError(f"--budgets: non-negative integers expected; got {text!r}")
    return budgets


def beyond_window(result: dict[str, Any]) -> float:
    """Accuracy over the queries farther than the window (every bucket but the first), from `hlsa.demo.evaluate`."""
    names = list(result["accuracy"])[1:]
    queries = sum(result["queries"][b] for b in names)
    return sum(result["accuracy"][b] * result["queries"][b] for b in names) / max(queries, 1)


def settings(policies: list[str], budgets: list[int], *, router: bool = True) -> list[tuple[str, int | None]]:
    """(policy, budget) pairs of a checkpoint with LTE layers (`router`) or full-attention ones. Budget 0 is the
    `window` policy alone: there every policy keeps the sinks only, and `window` needs no other budget. Budget None
    is a ceiling (a buffer for every token); without a router there is no `learned`, and the model as trained is
    the ceiling."""
    if not router:
        policies = [p for p in policies if p != "learned"]
    window = [("window", 0)] if "window" in policies or 0 in budgets else []
    others = [(p, b) for b in budgets if b > 0 for p in policies if p != "window"]
    return window + others + ([(p, None) for p in ("learned", "oracle") if p in policies] if router else [])


def _full_attention(model: Any) -> bool:
    return "attn" in model.config.mixers


def run(
    checkpoints: list[str],
    *,
    policies: list[str],
    budgets: list[int],
    examples: int,
    recipe: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate every setting of every checkpoint on the recall task; returns the JSON document."""
    from tqdm import tqdm

    from hlsa import demo
    from hlsa.loading import load_model

    recipe_options = demo.load_recipe(Path(recipe) if recipe else demo.DEFAULT_RECIPE)
    task, window = demo.recipe_task(recipe_options), demo.recipe_window(recipe_options)
    models, jobs = {}, []
    for path in checkpoints:
        model = load_model(path, dtype="float32")  # checked: config, every weight, nothing left random
        models[path] = model
        if model.config.lte_layers or _full_attention(model):
            jobs += [(path, p, b) for p, b in settings(policies, budgets, router=bool(model.config.lte_layers))]
        if not model.config.lte_layers:
            jobs.append((path, "reference", None))
    rows = []
    for path, policy, budget in tqdm(jobs, desc="arena", file=sys.stderr):
        model = models[path]
        row: dict[str, Any] = {"checkpoint": path, "name": Path(path).name, "policy": policy, "budget": budget}
        if policy == "reference" and _full_attention(model):
            model.set_eviction(None)  # as trained: every token in the cache
        elif policy != "reference":
            lte = bool(model.config.lte_layers)
            sinks = model.config.lte["sink_size"] if lte else ATTN_SINKS
            row["buffer_size"] = task.seq_len if budget is None else sinks + budget
            sizes = dict(buffer_size=row["buffer_size"], window=window, sink_size=sinks)
            # Bytes depend on N only, so the oracle, which has no cache of its own, is measured as one that has.
            model.set_eviction("learned" if lte else "window", **sizes)
        row["cache_bytes"] = demo.cache_bytes(model, task.seq_len)
        if policy != "reference":
            model.set_eviction(policy, seed=seed, **sizes)
        row.update(demo.evaluate(model, task, examples, window))
        row["beyond_window"] = beyond_window(row)
        rows.append(row)
    task_info = {"name": "recall", "seq_len": task.seq_len, "num_pairs": task.num_pairs, "queries": task.num_queries}
    return {
        "task": task_info,
        "window": window,
        "examples": examples,
        "seed": seed,
        "environment": _environment(),
        "results": rows,
    }


def _environment() -> dict[str, Any]:
    """Where the numbers come from: the command, hlsa's and torch's versions, the machine."""
    import platform

    import torch

    import hlsa

    return {
        "command": " ".join(["hlsa", *sys.argv[1:]]) if Path(sys.argv[0]).name == "hlsa" else " ".join(sys.argv),
        "hlsa": hlsa.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads",
    }


def _label(row: dict[str, Any]) -> str:
    if row["policy"] == "reference":
        return row["name"]
    return f"{row['name']}: {row['policy']}" + (" (buffer = every token)" if row["budget"] is None else "")


def render(doc: dict[str, Any]) -> str:
    """Markdown table: one row per setting, overall recall and recall beyond the window."""
    lines = [
        "| checkpoint | policy | budget | buffer N | cache KiB | recall | recall > W |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        budget = "-" if r["policy"] == "reference" else ("all" if r["budget"] is None else str(r["budget"]))
        cells = [r["name"], r["policy"], budget, str(r.get("buffer_size", "-")), f"{r['cache_bytes'] / 1024:.1f}"]
        cells += [f"{100 * r['overall']:.1f}%", f"{100 * r['beyond_window']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Recall (all queries, and beyond the window) against cache KiB per sequence: a line per policy and LTE
    checkpoint over the budgets (a marker per checkpoint), a star per ceiling (in its policy's colour), a square per
    reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = ("tab:blue", "tab:gray", "tab:green", "tab:orange", "tab:red", "tab:cyan", "tab:purple")
    colours = dict(zip(ARENA_POLICIES, palette, strict=True))
    others = iter(("tab:brown", "tab:pink", "tab:olive", "black", "gold", "navy") * 10)
    # A policy's colour is the same in every checkpoint; the marker tells the checkpoints apart.
    names = list(dict.fromkeys(r["name"] for r in doc["results"]))
    markers = dict(zip(names, ("o", "^", "D", "v", "P", "X") * 10))
    colours.update({r["name"]: next(others) for r in doc["results"] if r["policy"] == "reference"})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=120, sharey=True)
    for ax, key, title in zip(axes, ("overall", "beyond_window"), ("all queries", "queries beyond the window")):
        lines: dict[str, list[dict[str, Any]]] = {}
        for r in doc["results"]:
            if r["policy"] == "reference" or r["budget"] is None:
                marker, colour = (
                    ("s", colours[r["name"]]) if r["policy"] == "reference" else ("*", colours[r["policy"]])
                )
                ax.scatter(r["cache_bytes"] / 1024, 100 * r[key], marker=marker, s=70, color=colour, label=_label(r))
            else:
                lines.setdefault(_label(r), []).append(r)
        for label, rs in lines.items():
            rs.sort(key=lambda r: r["cache_bytes"])
            style = "--" if rs[0]["policy"] == "oracle" else "-"
            xs, ys = [r["cache_bytes"] / 1024 for r in rs], [100 * r[key] for r in rs]
            ax.plot(xs, ys, style, marker=markers[rs[0]["name"]], color=colours[rs[0]["policy"]], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("decode cache per sequence (KiB)")
        ax.set_title(f"recall, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    task = doc["task"]
    fig.suptitle(f"eviction arena: MQAR, {task['seq_len']} tokens, W = {doc['window']}, {doc['examples']} sequences")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path)
    plt.close(fig)


def run_cli(args: argparse.Namespace) -> int:
    """`hlsa eval arena`: run, print the table, write the JSON and the PNG."""
    import torch

    from hlsa.errors import UsageError
    from hlsa.loading import check_output_path

    _names(args.tasks, TASKS, "--tasks")
    if args.examples < 1 or args.threads < 1:
        raise UsageError("--examples and --threads must be >= 1")
    out = check_output_path(args.out, suffixes=(".json",))  # before the work, not after it
    torch.set_num_threads(args.threads)
    doc = run(
        args.checkpoints,
        policies=_names(args.policies, ARENA_POLICIES, "--policies"),
        budgets=_budgets(args.budgets),
        examples=args.examples,
        recipe=args.recipe,
        seed=args.seed,
    )
    print(render(doc))
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(f"[arena] wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0
