"""`hlsa generate`: stream a continuation from a saved checkpoint, with a tokenizer from a local path."""

from __future__ import annotations

import argparse

from hlsa.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a saved checkpoint (streams tokens)")
    p.add_argument("model", help="checkpoint directory (save_pretrained / `hlsa train` export)")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="local tokenizer directory, or 'byte' (default: the checkpoint's own, else hlsa's byte tokenizer)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    p.add_argument(
        "--top-k", type=int, default=None, help="sample among the k likeliest tokens (needs --temperature > 0)"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1] (needs --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's"
    )
    p.set_defaults(func=run)


def _check_sampling(args: argparse.Namespace) -> None:
    """Refuse sampling flags that transformers would reject deep inside `generate`, or silently ignore."""
    # `not x >= 0` rather than `x < 0`, and `not 0 < p <= 1`, so that NaN fails too.
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UsageError(
            "--top-k/--top-p need sampling but --temperature 0 is greedy: pass --temperature > 0 to sample"
        )


def run(args: argparse.Namespace) -> int:
    import sys

    import torch
    from transformers import TextStreamer

    from hlsa.eval.common import load_model, load_tokenizer, pick_device

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    _check_sampling(args)
    device = pick_device(args.device)
    # The tokenizer first: it is checked against the checkpoint's vocab_size before the weights are read.
    tok = load_tokenizer(args.model, args.tokenizer)
    model = load_model(args.model, device=device, dtype=args.dtype)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise UsageError("the prompt is empty after tokenization")
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_k=args.top_k,
        top_p=args.top_p,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        streamer=TextStreamer(tok, skip_prompt=False, skip_special_tokens=True),  # no <bos> in the echo
    )
    return 0
