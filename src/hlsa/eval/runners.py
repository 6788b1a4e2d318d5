"""The bodies of the `hlsa eval` subcommands: check every input and output first, then load, run, print a table and
write JSON/PNG."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hlsa.errors import UsageError, check_readable_file
from hlsa.eval.common import write_json
from hlsa.loading import (
    check_output_path,
    is_text_tokenizer,
    load_model,
    load_tokenizer,
    pick_device,
    read_config,
    tokenize,
)

PICTURE_SUFFIXES = (".png", ".svg", ".pdf")


def _load(args: argparse.Namespace) -> Any:
    return load_model(
        args.model, device=pick_device(args.device), dtype=args.dtype, allow_partial=args.allow_partial_weights
    )


def _require_text_tokenizer(tokenizer: Any, what: str, args: argparse.Namespace) -> None:
    if not is_text_tokenizer(tokenizer):
        raise UsageError(
            f"{what} are English text, but the tokenizer of {args.tokenizer or args.model} is a closed vocabulary of "
            f"{len(tokenizer)} symbols (a model of a synthetic task?); use a model trained on text"
        )


def _check_niah_args(args: argparse.Namespace, tasks: list[str]) -> None:
    from hlsa.eval.niah import TASKS

    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"--tasks: unknown {unknown or 'none given'}; choose from {', '.join(TASKS)}")
    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    if not args.lengths or min(args.lengths) < 1:
        raise UsageError(f"--lengths must be positive token counts, got {args.lengths}")
    if not args.depths or not all(0 <= d <= 100 for d in args.depths):  # NaN fails too
        raise UsageError(f"--depths must be percentages in [0, 100], got {args.depths}")
    if args.tokens_to_generate < 1:
        raise UsageError(f"--tokens-to-generate must be >= 1, got {args.tokens_to_generate}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")


def run_niah(args: argparse.Namespace) -> int:
    """`hlsa eval niah`: generate samples, then either export lm-eval tasks or run greedy decoding and score."""
    from hlsa.eval import niah

    tasks = [t for t in args.tasks.split(",") if t]
    _check_niah_args(args, tasks)
    if args.out:
        check_output_path(args.out)
    if args.export_lm_eval:
        check_output_path(Path(args.export_lm_eval) / "hlsa_niah_utils.py")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    _require_text_tokenizer(tokenizer, "niah's prompts", args)
    samples = niah.make_samples(
        tasks, tokenizer=tokenizer, lengths=args.lengths, depths=args.depths, num_samples=args.samples,
        seed=args.seed, tokens_to_generate=args.tokens_to_generate,
    )  # fmt: skip
    if args.export_lm_eval:
        from hlsa.eval.lm_eval_tasks import write_lm_eval_tasks

        names = write_lm_eval_tasks(args.export_lm_eval, samples, max_gen_toks=args.tokens_to_generate)
        print(f"wrote {len(samples)} samples as lm-eval tasks {','.join(names)} into {args.export_lm_eval}")
        return 0
    model = _load(args)
    start = time.perf_counter()
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else args.tokens_to_generate
    predictions = niah.generate_predictions(
        model, tokenizer, [s.prompt for s in samples], batch_size=args.batch_size, max_new_tokens=max_new_tokens
    )
    records = niah.score_samples(samples, predictions)
    summary = niah.summarize(records)
    print(niah.format_table(summary))
    print(f"{len(samples)} samples in {time.perf_counter() - start:.1f} s")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        write_json(args.out, {"settings": settings, "summary": summary, "records": records})
    return 0


def run_ppl(args: argparse.Namespace) -> int:
    """`hlsa eval ppl`: bucketed perplexity of a checkpoint over documents."""
    from hlsa.eval import ppl

    if args.block_size < 2 or args.bucket_size < 1:
        raise UsageError(f"need --block-size >= 2 and --bucket-size >= 1 (got {args.block_size}, {args.bucket_size})")
    if args.max_documents is not None and args.max_documents < 1:
        raise UsageError(f"--max-documents must be >= 1, got {args.max_documents}")
    if args.out:
        check_output_path(args.out)
    read_config(args.model)  # a bad model path is reported before the documents are read
    tokenizer = load_tokenizer(args.model, args.tokenizer)

    def documents() -> Iterator[str]:
        return ppl.iter_documents(
            args.data, text_field=args.text_field, split=args.split, dataset_config=args.dataset_config
        )

    if Path(args.data).exists():  # local documents are read and tokenized once before the model loads
        for text in documents():
            tokenize(tokenizer, text)
    model = _load(args)
    result = ppl.perplexity_by_position(
        model, tokenizer, documents(), block_size=args.block_size, bucket_size=args.bucket_size,
        max_documents=args.max_documents, min_tokens=args.min_tokens,
    )  # fmt: skip
    result = {"model": str(args.model), "data": args.data, **result}
    print(ppl.format_table(result))
    if args.out:
        write_json(args.out, result)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """`hlsa eval inspect`: eviction picture + kept-count table for one prompt."""
    from hlsa.eval import inspect

    check_output_path(args.out, suffixes=PICTURE_SUFFIXES)
    if args.json:
        check_output_path(args.json)
    if args.prompt_file:
        check_readable_file(Path(args.prompt_file), "the prompt")
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    if "lte" not in read_config(args.model).mixers:
        raise UsageError(f"model {args.model} has no LTE layer: eviction pictures need layer type 'lte'")
    prompt, needle = _inspect_prompt(args, tokenizer)
    model = _load(args)
    result = inspect.inspect_prompt(model, tokenizer, prompt, needle=needle)
    print(inspect.format_table(result))
    inspect.render(result, args.out, title=f"{Path(args.model).name}: LTE retained tokens")
    print(f"wrote {args.out}")
    if args.json:
        write_json(args.json, result.to_json())
    return 0


def _inspect_prompt(args: argparse.Namespace, tokenizer: Any) -> tuple[str, tuple[int, int] | None]:
    """(prompt, needle character span or None) from --prompt / --prompt-file / --niah and --needle."""
    if args.niah:
        from hlsa.eval.niah import make_sample

        _require_text_tokenizer(tokenizer, "--niah prompts", args)
        s = make_sample(args.niah, tokenizer=tokenizer, max_length=args.length, depth=args.depth, index=0,
                        seed=args.seed, tokens_to_generate=0)  # fmt: skip
        return s.prompt, (s.needle_start, s.needle_end)
    if args.prompt is not None:
        from hlsa.generate import read_prompt

        prompt = read_prompt(args.prompt)
    else:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file {args.prompt_file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    if args.needle is None:
        return prompt, None
    start = prompt.find(args.needle)
    if start < 0:
        raise UsageError(f"--needle {args.needle!r} does not occur in the prompt")
    return prompt, (start, start + len(args.needle))
