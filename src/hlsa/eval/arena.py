"""`hlsa eval arena`: eviction policies against each other at equal cache bytes.

Every LTE checkpoint is evaluated under each eviction policy (`hlsa.layers.eviction`) and buffer budget; a budget
`b` is the number of buffer slots beyond the sinks (`buffer_size = sink_size + b`), so at budget 0 every policy is
sinks + window: the `window` policy is evaluated there, and only there. Two within-model ceilings use a buffer that
holds every token (`buffer_size` = the task's longest sequence): `learned` (the router keeps every token it scores
positive) and `oracle` (then full causal attention in the LTE layers). A checkpoint with full-attention layers and no
LTE layer (a Transformer, GDN+attention) is evaluated as it is (its full cache, the ceiling) and under every policy
but `learned` (it has no router), its full-attention layers then keeping `ATTN_SINKS` sinks + the window W + the
buffer in LTE's constant cache. A checkpoint without either (GDN+NSA, GDN+SWA, GDN) is evaluated once as it is, as a
reference. Cache bytes are those of one sequence's decode cache after a prompt of the task's longest sequence
(`HybridCache.nbytes()`); they depend on the buffer size, and on the policy only where it keeps state of its own
(`delta_write`'s memory); the oracle, which keeps every key, is placed at the bytes of the cache it is compared with.

Tasks (`hlsa.eval.arena_tasks`): `recall` (the demo's MQAR), `passkey` and `needle` (RULER's needle prompts), `ppl`
(perplexity of a text file's documents); each gives one number per setting. A task runs on the checkpoints whose
tokenizer fits it; the others are skipped with a note, and a task that fits none of them is an error. W is the
window of the checkpoints' LTE layers (else the recipe's), or `--window`. Writes a JSON file with the rows of every
task, a PNG with a panel per task (its number against cache bytes), and prints a table per task.
Module-level imports stay light (no torch), as in `hlsa.eval.cli`, which imports `add_arena_parser`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hlsa.errors import UsageError
from hlsa.eval.arena_tasks import ARENA_POLICIES, TASKS, ArenaTask, TaskMismatchError

# Sinks of a full-attention layer under a policy (StreamingLLM's four); LTE layers keep their config's.
ATTN_SINKS = 4


def add_arena_parser(sub: argparse._SubParsersAction) -> None:
    """Add `arena` to the subcommands of `hlsa eval`."""
    from hlsa.cli import HelpFormatter

    p = sub.add_parser(
        "arena", help="eviction policies against each other at equal cache bytes", formatter_class=HelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="hlsa checkpoint directories")
    p.add_argument("--tasks", default="recall", help=f"comma-separated, of {','.join(TASKS)}")
    policies = ",".join(ARENA_POLICIES)
    p.add_argument("--policies", default=None, help=f"comma-separated, of {policies} (default: all that fit a task)")
    p.add_argument("--budgets", default="0,32,64,128,256", help="buffer slots beyond the sinks, comma-separated")
    p.add_argument("--window", type=int, default=None,
                   help="W of full-attention layers under a policy and of 'beyond the window' (default: the LTE "
                   "layers' W, else the recipe's)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="arena.json", help="JSON path; the plot goes beside it as .png")
    g = p.add_argument_group("recall")
    g.add_argument("--examples", type=int, default=128, help="sequences per setting")
    g.add_argument("--recipe", default=None, help="the recipe whose [data] defines the recall task (default: demo's)")
    g = p.add_argument_group("passkey and needle")
    g.add_argument("--lengths", default="1024,2048", help="prompt lengths in tokens (each above W), comma-separated")
    g.add_argument("--depths", default="10,50,90", help="needle depths in percent, comma-separated")
    g.add_argument("--samples", type=int, default=2, help="prompts per length x depth")
    g = p.add_argument_group("ppl")
    g.add_argument("--text", default=None, help="documents: a .txt file, a directory of .txt files or a .jsonl file")
    g.add_argument("--text-field", default="text", help="document field of .jsonl records")
    g.add_argument("--documents", type=int, default=4, help="documents scored (those with a token beyond W)")
    g.add_argument("--block-size", type=int, default=2048, help="tokens scored per document")
    p.set_defaults(func=run_cli)


def _names(text: str, allowed: tuple[str, ...] | dict[str, Any], option: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        raise UsageError(f"{option}: unknown or empty {unknown}; choose from {','.join(allowed)}")
    return list(dict.fromkeys(names))


def _numbers(text: str, option: str, kind: type = int) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x]
    except ValueError as e:
        raise UsageError(f"{option}: comma-separated {kind.__name__}s expected; got {text!r}") from e


def _budgets(text: str) -> list[int]:
    budgets = sorted(set(_numbers(text, "--budgets")))
    if not budgets or budgets[0] < 0:
        raise UsageError(f"--budgets: non-negative integers expected; got {text!r}")
    return budgets


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


def sweep_window(configs: list[Any], window: int | None, recipe: Callable[[], dict[str, Any]]) -> int:
    """W of the sweep: `window` if given, else that of the LTE layers of `configs` (one W for all of them), else
    the `[demo]` window of `recipe()` (called only then)."""
    from hlsa import demo

    if window is not None:
        if window < 1:
            raise UsageError(f"--window must be >= 1, got {window}")
        return window
    windows = sorted({c.lte["window_size"] for c in configs if c.lte_layers})
    if len(windows) > 1:
        raise UsageError(f"the LTE checkpoints have windows {windows}; pass --window W (the one to compare at)")
    return windows[0] if windows else demo.recipe_window(recipe())


def _full_attention(config: Any) -> bool:
    return "attn" in config.mixers


def checkpoint_names(paths: list[str]) -> dict[str, str]:
    """A label per checkpoint for tables and plots: its folder's name, with as many parent folders as it takes to
    tell apart checkpoints whose folders share a name (`runs/a/model`, `runs/b/model` -> `a/model`, `b/model`)."""
    parts = {p: Path(p).resolve().parts for p in dict.fromkeys(paths)}
    depth = dict.fromkeys(parts, 1)
    while True:
        names = {p: "/".join(parts[p][-depth[p] :]) for p in parts}
        clashing = [p for p in parts if list(names.values()).count(names[p]) > 1 and depth[p] < len(parts[p])]
        if not clashing:
            return names
        for p in clashing:
            depth[p] += 1


def prepare(checkpoints: list[str], tasks: list[ArenaTask]) -> tuple[dict[tuple[str, str], Any], list[dict]]:
    """Each task's inputs per checkpoint it fits, and a record per (task, checkpoint) it does not. A task that
    fits none of the checkpoints is an error; a skipped one is printed as a note."""
    inputs, skipped = {}, []
    for task in tasks:
        reasons = {}
        for path in checkpoints:
            try:
                inputs[task.name, path] = task.prepare(path)
            except TaskMismatchError as e:
                reasons[path] = str(e)
        if len(reasons) == len(checkpoints):
            why = "; ".join(f"{path}: {reason}" for path, reason in reasons.items())
            raise UsageError(f"--tasks {task.name} fits none of the checkpoints ({why})")
        for path, reason in reasons.items():
            print(f"[arena] {task.name} skips {path}: {reason}", file=sys.stderr)
            skipped.append({"task": task.name, "checkpoint": path, "reason": reason})
    return inputs, skipped


def run(
    checkpoints: list[str], tasks: list[ArenaTask], *, policies: list[str], budgets: list[int], window: int,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate every setting of every checkpoint on every task that fits it; returns the JSON document."""
    from tqdm import tqdm

    from hlsa import demo
    from hlsa.layers.eviction import STATEFUL
    from hlsa.loading import load_model

    inputs, skipped = prepare(checkpoints, tasks)
    models = {}  # checked: config, every weight, nothing left random
    for path in dict.fromkeys(path for _, path in inputs):
        models[path] = load_model(path, dtype="float32")
    jobs = []
    for task in tasks:
        own = [p for p in policies if p in task.policies]
        for path in checkpoints:
            if (task.name, path) not in inputs:
                continue
            config = models[path].config
            if config.lte_layers or _full_attention(config):
                jobs += [(task, path, p, b) for p, b in settings(own, budgets, router=bool(config.lte_layers))]
            if not config.lte_layers:
                jobs.append((task, path, "reference", None))
    results: dict[str, list[dict[str, Any]]] = {task.name: [] for task in tasks}
    names = checkpoint_names(checkpoints)
    # cache bytes by (checkpoint, buffer size, length, the policy's own state if it keeps one)
    measured: dict[tuple[str, int | None, int, str | None], int] = {}
    for task, path, policy, budget in tqdm(jobs, desc="arena", file=sys.stderr):
        model = models[path]
        row: dict[str, Any] = {"checkpoint": path, "name": names[path], "policy": policy, "budget": budget}
        lte = bool(model.config.lte_layers)
        if policy == "reference" and _full_attention(model.config):
            model.set_eviction(None)  # as trained: every token in the cache
        elif policy != "reference":
            sinks = model.config.lte["sink_size"] if lte else ATTN_SINKS
            row["buffer_size"] = task.length if budget is None else sinks + budget
            sizes = dict(buffer_size=row["buffer_size"], window=window, sink_size=sinks)
        stateful = policy if policy in STATEFUL else None
        key = (path, row.get("buffer_size"), task.length, stateful)
        if key not in measured:
            if policy != "reference":
                # Bytes depend on N (and a stateful policy's state) only, so the other policies are measured under
                # a fast one, and the oracle, which has no cache of its own, as one that has.
                model.set_eviction(stateful or ("learned" if lte else "window"), **sizes)
            measured[key] = demo.cache_bytes(model, task.length)
        row["cache_bytes"] = measured[key]
        if policy != "reference":
            model.set_eviction(policy, seed=seed, **sizes)
        row.update(task.evaluate(model, inputs[task.name, path], policy))
        results[task.name].append(row)
    return {
        "tasks": {task.name: task.info() for task in tasks},
        "window": window,
        "seed": seed,
        "environment": _environment(),
        "results": results,
        "skipped": skipped,
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


def render(doc: dict[str, Any]) -> str:
    """Markdown tables, one per task: a row per setting, the task's numbers."""
    parts = []
    for name, rows in doc["results"].items():
        info = doc["tasks"][name]
        head = ["checkpoint", "policy", "budget", "buffer N", "cache KiB", *TASKS[name].columns(info)]
        better = "higher" if info["higher_is_better"] else "lower"
        lines = [f"{name}: {info['label']} ({better} is better), W = {doc['window']}", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            budget = "-" if r["policy"] == "reference" else ("all" if r["budget"] is None else str(r["budget"]))
            cells = [r["name"], r["policy"], budget, str(r.get("buffer_size", "-")), f"{r['cache_bytes'] / 1024:.1f}"]
            lines.append("| " + " | ".join(cells + TASKS[name].cells(r)) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(doc: dict[str, Any], path: Path) -> None:
    """A panel per task: its number against cache KiB per sequence, a line per policy and checkpoint over the
    budgets (colour: the policy, the same in every panel; marker: the checkpoint), a star per ceiling (a buffer for
    every token, in its policy's colour), a square per model as trained. Each panel's axis says which way is better
    (accuracy up, perplexity down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    names = [name for name, rows in doc["results"].items() if rows]
    rows_all = [r for name in names for r in doc["results"][name]]
    palette = ("tab:blue", "tab:gray", "tab:green", "tab:orange", "magenta", "tab:red", "tab:cyan", "tab:olive",
               "tab:purple")  # fmt: skip
    colours = dict(zip(ARENA_POLICIES, palette, strict=True))
    others = iter(("tab:brown", "tab:pink", "black", "gold", "navy", "lime") * 10)
    as_trained = dict.fromkeys(r["name"] for r in rows_all if r["policy"] == "reference")
    references = {name: next(others) for name in as_trained}
    evicting = list(dict.fromkeys(r["name"] for r in rows_all if r["policy"] != "reference"))
    markers = dict(zip(evicting, ("o", "^", "D", "v", "P", "X") * 10))
    legend_in = 2.2  # inches of the legend column, whatever the number of panels
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names) + legend_in, 4), dpi=120, squeeze=False)
    for ax, name in zip(axes[0], names):
        info = doc["tasks"][name]
        scale, key = (100 if info["fraction"] else 1), info["metric"]
        lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in doc["results"][name]:
            x, y = r["cache_bytes"] / 1024, scale * r[key]
            if r["policy"] == "reference":
                ax.scatter(x, y, marker="s", s=70, color=references[r["name"]])
            elif r["budget"] is None:
                ax.scatter(x, y, marker="*", s=110, color=colours[r["policy"]], edgecolors="black", linewidths=0.5)
            else:
                lines.setdefault((r["name"], r["policy"]), []).append(r)
        for (ckpt, policy), rs in lines.items():
            rs.sort(key=lambda r: r["cache_bytes"])
            xs, ys = [r["cache_bytes"] / 1024 for r in rs], [scale * r[key] for r in rs]
            ax.plot(xs, ys, "--" if policy == "oracle" else "-", marker=markers[ckpt], color=colours[policy])
        ax.set_xscale("log")
        # A few hundred KiB span less than three decades: label 1-2-5 steps in plain numbers, no minor labels.
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("decode cache per sequence (KiB)")
        better = "higher" if info["higher_is_better"] else "lower"
        ax.set_ylabel(f"{info['label']}{' (%)' if info['fraction'] else ''}, {better} is better")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    # One legend entry per policy (colour), per checkpoint (marker) and per model as trained, not one per line.
    used = list(dict.fromkeys(r["policy"] for r in rows_all if r["policy"] != "reference"))
    handles = [Line2D([], [], color=colours[p], linestyle="--" if p == "oracle" else "-", label=p) for p in used]
    handles += [Line2D([], [], color="black", marker=markers[n], linestyle="", label=n) for n in evicting]
    if any(r["budget"] is None and r["policy"] != "reference" for r in rows_all):
        handles.append(Line2D([], [], color="white", marker="*", markersize=11, markeredgecolor="black",
                              linestyle="", label="buffer = every token"))  # fmt: skip
    for ckpt, colour in references.items():
        handles.append(Line2D([], [], color=colour, marker="s", linestyle="", label=f"{ckpt} as trained"))
    fig.legend(handles=handles, fontsize=7, loc="center right")
    fig.suptitle(f"eviction arena: W = {doc['window']}")
    fig.tight_layout(rect=(0, 0, 1 - legend_in / fig.get_figwidth(), 1))
    fig.savefig(path)
    plt.close(fig)


def build_tasks(
    args: argparse.Namespace, names: list[str], window: int, recipe: Callable[[], dict[str, Any]]
) -> list[ArenaTask]:
    """The tasks of `names` from the command's options, each checked against W before any model loads."""
    from hlsa.eval.arena_tasks import Needle, Passkey, Perplexity, Recall

    tasks: list[ArenaTask] = []
    for name in names:
        if name == "recall":
            tasks.append(Recall(recipe(), window, args.examples))
        elif name in ("passkey", "needle"):
            lengths = _numbers(args.lengths, "--lengths")
            depths = _numbers(args.depths, "--depths", float)
            if not lengths or min(lengths) <= window:
                raise UsageError(
                    f"--lengths: token counts above the window W = {window} expected (within it no policy evicts "
                    f"anything); got {args.lengths!r}"
                )
            if not depths or not all(0 <= d <= 100 for d in depths):  # NaN fails too
                raise UsageError(f"--depths: percentages in [0, 100] expected; got {args.depths!r}")
            tasks.append((Passkey if name == "passkey" else Needle)(window, lengths, depths, args.samples))
        else:
            if args.block_size <= window + 2:
                raise UsageError(
                    f"--block-size {args.block_size} leaves no token beyond the window: it must exceed W + 2 = "
                    f"{window + 2}"
                )
            tasks.append(Perplexity(window, args.text, args.text_field, args.documents, args.block_size))
    return tasks


def _check_text(args: argparse.Namespace) -> None:
    if args.text is None:
        raise UsageError(
            "--tasks ppl needs --text PATH: the documents to score (a .txt file, a directory of .txt files or a "
            ".jsonl file)"
        )
    path = Path(args.text)
    if not (path.is_dir() or (path.is_file() and path.suffix in (".txt", ".jsonl"))):
        raise UsageError(f"--text {args.text}: expected an existing .txt file, .jsonl file or directory of .txt files")


def run_cli(args: argparse.Namespace) -> int:
    """`hlsa eval arena`: check every option, then run, print the tables, write the JSON and the PNG."""
    from hlsa import demo
    from hlsa.loading import check_output_path, read_config

    names = _names(args.tasks, TASKS, "--tasks")
    policies = list(ARENA_POLICIES)  # by default each runs on the tasks it fits; named ones must fit one
    if args.policies is not None:
        policies = _names(args.policies, ARENA_POLICIES, "--policies")
        for policy in policies:
            if not any(policy in TASKS[name].policies for name in names):
                fits = [name for name, task in TASKS.items() if policy in task.policies]
                raise UsageError(
                    f"--policies: {policy} runs on none of --tasks {','.join(names)} (it needs a prompt to "
                    f"compress: tasks {','.join(fits)})"
                )
    budgets = _budgets(args.budgets)
    for option in ("examples", "threads", "samples", "documents"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option} must be >= 1, got {getattr(args, option)}")
    if "ppl" in names:
        _check_text(args)
    out = check_output_path(args.out, suffixes=(".json",))  # before the work, not after it
    configs = [read_config(path) for path in args.checkpoints]

    # Read once, and only when needed: an installed hlsa has no demo recipe of its own, and text tasks need none.
    @functools.cache
    def recipe() -> dict[str, Any]:
        return demo.load_recipe(Path(args.recipe) if args.recipe else demo.DEFAULT_RECIPE)

    window = sweep_window(configs, args.window, recipe)
    tasks = build_tasks(args, names, window, recipe)
    import torch

    torch.set_num_threads(args.threads)
    doc = run(args.checkpoints, tasks, policies=policies, budgets=budgets, window=window, seed=args.seed)
    print(render(doc))
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(f"[arena] wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0
