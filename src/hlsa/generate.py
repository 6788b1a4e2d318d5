"""`hlsa generate`: stream a continuation from a saved checkpoint, with a tokenizer from a local path."""

from __future__ import annotations

import argparse
import math
import sys

from hlsa.cli import HelpFormatter
from hlsa.errors import UsageError
from hlsa.loading import DTYPE_NAMES


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint, tokenizer, device and dtype flags that every command running a model shares."""
    p.add_argument("model", help="checkpoint directory (save_pretrained / `hlsa train` export)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="local tokenizer directory, or 'byte' (default: the checkpoint's own, else hlsa's byte tokenizer)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default: the checkpoint's")
    p.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="load a checkpoint whose weights do not match its config (the mismatched tensors are random)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a saved checkpoint (streams tokens)",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    p.add_argument(
        "--top-k", type=int, default=None, help="sample among the k likeliest tokens (needs --temperature > 0)"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1] (needs --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.set_defaults(func=run)


def _check_sampling(args: argparse.Namespace) -> None:
    """Refuse sampling flags that transformers would reject deep inside `generate`, or silently ignore."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # written so that NaN fails too
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UsageError(
            "--top-k/--top-p need sampling but --temperature 0 is greedy: pass --temperature > 0 to sample"
        )


def read_prompt(prompt: str) -> str:
    """The `--prompt` text, or standard input for `-`; refuses text that is not valid UTF-8."""
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"standard input is not UTF-8 text (byte {e.start}: {e.reason}); convert it") from None
    try:  # Python keeps undecodable command-line bytes as lone surrogates, which no tokenizer can encode
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"--prompt is not UTF-8 text (character {e.start}); pass UTF-8 or use --prompt -") from None
    return prompt


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from hlsa.loading import load_model, load_tokenizer, pick_device, tokenize

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _check_sampling(args)
    device = pick_device(args.device)
    prompt = read_prompt(args.prompt)
    # The tokenizer first: it is checked against the checkpoint's vocab_size before the weights are read.
    tok = load_tokenizer(args.model, args.tokenizer)
    ids = tokenize(tok, prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UsageError("the prompt is empty after tokenization")
    model = load_model(args.model, device=device, dtype=args.dtype, allow_partial=args.allow_partial_weights)
    ids = ids.to(device)
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
