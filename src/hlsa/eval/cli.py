"""`hlsa eval {niah,ppl,inspect,arena}` and `hlsa convert`: argument parsing only; the work lives in the sibling
modules.

Module-level imports stay light (no torch, no transformers) so that `hlsa --help` answers at once.
"""

from __future__ import annotations

import argparse

from hlsa.cli import HelpFormatter
from hlsa.eval.arena import add_arena_parser
from hlsa.eval.niah import TASKS
from hlsa.generate import add_model_arguments


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` (with `niah`, `ppl`, `inspect`, `arena`) and `convert` to the `hlsa` command."""
    ev = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint (needle tests, perplexity, eviction pictures)",
        description="Evaluate a checkpoint: niah (needle tests, text models), ppl (perplexity by position), inspect "
        "(LTE eviction pictures), arena (eviction policies at equal cache bytes). lm-evaluation-harness runs "
        "through `python -m hlsa.eval.harness`.",
    )
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    p = sub.add_parser(
        "niah",
        help="offline RULER-style needle-in-a-haystack accuracy by length x depth",
        description="Offline RULER-style needle-in-a-haystack accuracy by length x depth. Tasks: "
        + ", ".join(TASKS)
        + ". Needs a model trained on text (its tokenizer must encode English).",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument(
        "--tasks",
        default="niah_single_1,niah_single_2,niah_single_3",
        help="comma-separated task names, of: " + ", ".join(TASKS),
    )
    p.add_argument("--lengths", type=_ints, default="1024,2048,4096", help="prompt lengths in tokens, e.g. 1024,2048")
    p.add_argument("--depths", type=_floats, default="0,25,50,75,100", help="needle depths in percent")
    p.add_argument("--samples", type=int, default=4, help="samples per task x length x depth")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts")
    p.add_argument("--tokens-to-generate", type=int, default=128, help="generation budget counted in each length")
    p.add_argument("--max-new-tokens", type=int, default=None, help="(default: --tokens-to-generate)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--out", default=None, help="write the summary and every prediction to this JSON file")
    p.add_argument(
        "--export-lm-eval",
        default=None,
        metavar="DIR",
        help="write the samples as lm-eval tasks into DIR (for --include_path) instead of running the model; "
        "MODEL then only supplies the tokenizer",
    )
    p.set_defaults(func=_run_niah)

    p = sub.add_parser("ppl", help="perplexity by token position over long documents", formatter_class=HelpFormatter)
    add_model_arguments(p)
    p.add_argument("--data", required=True, help=".txt file, directory of .txt, .jsonl, or a Hugging Face dataset name")
    p.add_argument("--text-field", default="text", help="document field of .jsonl / dataset records")
    p.add_argument("--split", default="test", help="dataset split (Hugging Face datasets only)")
    p.add_argument("--dataset-config", default=None, help="dataset configuration name (Hugging Face datasets only)")
    p.add_argument("--block-size", type=int, default=28672, help="tokens kept per document (the authors' value)")
    p.add_argument("--bucket-size", type=int, default=2048, help="positions per perplexity bucket")
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many (default: all)")
    p.add_argument("--min-tokens", type=int, default=2, help="skip shorter documents")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.set_defaults(func=_run_ppl)

    p = sub.add_parser(
        "inspect",
        help="picture of the tokens each LTE head retains after a prompt",
        description="Picture of the tokens each LTE head retains after a prompt (models with LTE layers only).",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    src.add_argument("--niah", metavar="TASK", help="generate a needle prompt of this task: " + ", ".join(TASKS))
    p.add_argument("--needle", default=None, help="substring of the prompt to mark (first occurrence)")
    p.add_argument("--length", type=int, default=1024, help="--niah prompt length in tokens")
    p.add_argument("--depth", type=float, default=50.0, help="--niah needle depth in percent")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts")
    p.add_argument("--out", default="lte_eviction.png", help="picture path (.png, .svg or .pdf)")
    p.add_argument("--json", default=None, help="also write kept counts to this JSON file")
    p.set_defaults(func=_run_inspect)
    add_arena_parser(sub)

    p = subparsers.add_parser("convert", help="convert a checkpoint of the authors' code into an hlsa checkpoint")
    p.add_argument("src", help="directory with config.json + model.safetensors or pytorch_model.bin (authors' format)")
    p.add_argument("dst", help="output directory (hlsa format)")
    p.set_defaults(func=_run_convert)


def _run_niah(args: argparse.Namespace) -> int:
    from hlsa.eval.runners import run_niah

    return run_niah(args)


def _run_ppl(args: argparse.Namespace) -> int:
    from hlsa.eval.runners import run_ppl

    return run_ppl(args)


def _run_inspect(args: argparse.Namespace) -> int:
    from hlsa.eval.runners import run_inspect

    return run_inspect(args)


def _run_convert(args: argparse.Namespace) -> int:
    from hlsa.convert import convert_checkpoint

    kwargs = convert_checkpoint(args.src, args.dst)
    print(f"converted {args.src} -> {args.dst}: {kwargs['num_hidden_layers']} layers, mixers {kwargs['mixers']}")
    return 0
