"""The bodies of the `hlsa eval` subcommands: load, run, print a table, write JSON/PNG."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hlsa.errors import UsageError
from hlsa.eval.common import load_model, load_tokenizer, pick_device, write_json


def run_niah(args: argparse.Namespace) -> int:
    """`hlsa eval niah`: generate samples, then either export lm-eval tasks or run greedy decoding and score."""
    from hlsa.eval import niah

    tasks = [t for t in args.tasks.split(",") if t]
    tokenizer = load_tokenizer(args.model, args.tokenizer)
    samples = niah.make_samples(
        tasks, tokenizer=tokenizer, lengths=args.lengths, depths=args.depths, num_samples=args.samples,
        seed=args.seed, tokens_to_generate=args.tokens_to_generate,
    )  # fmt: skip
    if args.export_lm_eval:
        from hlsa.eval.lm_eval_tasks import write_lm_eval_tasks

        names = write_lm_eval_tasks(args.export_lm_eval, samples, max_gen_toks=args.tokens_to_generate)
        print(f"wrote {len(samples)} samples as lm-eval tasks {','.join(names)} into {args.export_lm_eval}")
        return 0
    model = load_model(args.model, device=pick_device(args.device), dtype=args.dtype)
    start = time.perf_counter()
    predictions = niah.generate_predictions(
        model, tokenizer, [s.prompt for s in samples], batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens or args.tokens_to_generate,
    )  # fmt: skip
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

    tokenizer = load_tokenizer(args.model, args.tokenizer)
    model = load_model(args.model, device=pick_device(args.device), dtype=args.dtype)
    docs = ppl.iter_documents(
        args.data, text_field=args.text_field, split=args.split, dataset_config=args.dataset_config
    )
    result = ppl.perplexity_by_position(
        model, tokenizer, docs, block_size=args.block_size, bucket_size=args.bucket_size,
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

    tokenizer = load_tokenizer(args.model, args.tokenizer)
    model = load_model(args.model, device=pick_device(args.device), dtype=args.dtype)
    prompt, needle = _inspect_prompt(args, tokenizer)
    result = inspect.inspect_prompt(model, tokenizer, prompt, needle=needle)
    print(inspect.format_table(result))
    inspect.render(result, args.out, title=f"{Path(args.model).name}: LTE retained tokens")
    print(f"wrote {args.out}")
    if args.json:
        write_json(args.json, result.to_json())
    return 0


def _inspect_prompt(args: argparse.Namespace, tokenizer: object) -> tuple[str, tuple[int, int] | None]:
    """(prompt, needle character span or None) from --prompt / --prompt-file / --niah and --needle."""
    if args.niah:
        from hlsa.eval.niah import make_sample

        s = make_sample(args.niah, tokenizer=tokenizer, max_length=args.length, depth=args.depth, index=0,
                        seed=args.seed, tokens_to_generate=0)  # fmt: skip
        return s.prompt, (s.needle_start, s.needle_end)
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
    if args.needle is None:
        return prompt, None
    start = prompt.find(args.needle)
    if start < 0:
        raise UsageError(f"--needle {args.needle!r} does not occur in the prompt")
    return prompt, (start, start + len(args.needle))
