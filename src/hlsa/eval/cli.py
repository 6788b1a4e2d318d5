"""`hlsa eval {niah,ppl,inspect}` and `hlsa convert`: argument parsing only; the work lives in the sibling modules.

Module-level imports stay light (argparse only) so that `hlsa --help` does not import torch or transformers.
"""

from __future__ import annotations

import argparse


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hlsa checkpoint directory (config.json + weights)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, or 'byte' (default: the checkpoint's own)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: checkpoint's")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` (with `niah`, `ppl`, `inspect`) and `convert` to the `hlsa` command."""
    ev = subparsers.add_parser("eval", help="evaluate a checkpoint (needle tests, perplexity, eviction pictures)")
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    p = sub.add_parser("niah", help="offline RULER-style needle-in-a-haystack accuracy by length x depth")
    _model_args(p)
    p.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_single_3", help="comma-separated task names")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096], help="prompt lengths in tokens, e.g. 1024,2048")
    p.add_argument("--depths", type=_floats, default=[0.0, 25.0, 50.0, 75.0, 100.0], help="needle depths in percent")
    p.add_argument("--samples", type=int, default=4, help="samples per task x length x depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens-to-generate", type=int, default=128, help="generation budget counted in each length")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: --tokens-to-generate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="write the summary and every prediction to this JSON file")
    p.add_argument(
        "--export-lm-eval",
        default=None,
        metavar="DIR",
        help="write the samples as lm-eval tasks into DIR (for --include_path) instead of running the model; "
        "MODEL then only supplies the tokenizer",
    )
    p.set_defaults(func=_run_niah)

    p = sub.add_parser("ppl", help="perplexity by token position over long documents")
    _model_args(p)
    p.add_argument("--data", required=True, help=".txt file, directory of .txt, .jsonl, or a Hugging Face dataset name")
    p.add_argument("--text-field", default="text", help="document field of .jsonl / dataset records")
    p.add_argument("--split", default="test", help="dataset split (Hugging Face datasets only)")
    p.add_argument("--dataset-config", default=None, help="dataset configuration name (Hugging Face datasets only)")
    p.add_argument("--block-size", type=int, default=28672, help="tokens kept per document (the authors': 28672)")
    p.add_argument("--bucket-size", type=int, default=2048)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--min-tokens", type=int, default=2, help="skip shorter documents")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.set_defaults(func=_run_ppl)

    p = sub.add_parser("inspect", help="picture of the tokens each LTE head retains after a prompt")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    src.add_argument("--niah", metavar="TASK", help="generate a needle prompt of this task (see hlsa eval niah)")
    p.add_argument("--needle", default=None, help="substring of the prompt to mark (first occurrence)")
    p.add_argument("--length", type=int, default=1024, help="--niah prompt length in tokens")
    p.add_argument("--depth", type=float, default=50.0, help="--niah needle depth in percent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lte_eviction.png", help="PNG path")
    p.add_argument("--json", default=None, help="also write kept counts to this JSON file")
    p.set_defaults(func=_run_inspect)

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
