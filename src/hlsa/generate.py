"""`hlsa generate`: stream a continuation from a saved checkpoint, with a tokenizer from a local path."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a saved checkpoint (streams tokens)")
    p.add_argument("model", help="checkpoint directory (save_pretrained / `hlsa train` export)")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="local tokenizer directory (default: the checkpoint's own, else hlsa's byte-level tokenizer)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's"
    )
    p.set_defaults(func=run)


def load_tokenizer(model_dir: str, tokenizer: str | None):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    path = tokenizer or model_dir
    has_own = any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    if tokenizer is not None and not has_own:
        raise SystemExit(f"--tokenizer {tokenizer}: no tokenizer.json/tokenizer_config.json there")
    if has_own:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    from hlsa.tokenizer import byte_tokenizer

    return byte_tokenizer()


def run(args: argparse.Namespace) -> int:
    import sys

    import torch
    from transformers import TextStreamer

    from hlsa import HybridForCausalLM

    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"{args.model}: not a checkpoint directory (no config.json)")
    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    model = HybridForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    tok = load_tokenizer(args.model, args.tokenizer)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise SystemExit("the prompt is empty after tokenization")
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample else None,
        top_k=args.top_k if sample else None,
        top_p=args.top_p if sample else None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        streamer=TextStreamer(tok, skip_prompt=False),
    )
    return 0
