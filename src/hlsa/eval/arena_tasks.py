"""The tasks of `hlsa eval arena`: what each measures of one model under one eviction setting, which checkpoints it
fits, and the number the arena plots against cache bytes.

| task | data | number plotted | better |
|---|---|---|---|
| `recall` | the recipe's MQAR sequences (`hlsa.demo.evaluate`) | recall of queries farther than W | higher |
| `passkey` | RULER's `niah_single_1`: a 7-digit number in repeated noise | exact-match accuracy | higher |
| `needle` | RULER's `niah_single_2`: a 7-digit number in an essay | exact-match accuracy | higher |
| `ppl` | documents of a text file (`hlsa.eval.ppl`) | perplexity of the tokens beyond W | lower |

The needle prompts come from `hlsa.eval.niah` (those of `hlsa eval niah --seed 0`), answered greedily.

A task fits a checkpoint by its tokenizer: `recall` feeds the token ids of the recipe's MQAR task, so the checkpoint
must carry that task's tokenizer (`hlsa.tokenizer.task_tokenizer`, as the demo checkpoints do); the other tasks
encode English, so they need a text tokenizer (the checkpoint's own, or hlsa's byte tokenizer when it saved none, as
for `hlsa eval niah`). `prepare` raises `TaskMismatchError` for a checkpoint that the task does not fit.

`snapkv` compresses a prompt, so it runs on `passkey` and `needle` (a prompt, then the answer) only: recall interleaves
pairs and queries, and perplexity scores every position of a document, so neither has a prompt to compress.

Module-level imports stay light (no torch): `hlsa eval --help` reads the task names from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from hlsa.errors import UsageError

# Every eviction policy (`hlsa.layers.eviction.POLICIES`, which imports torch), and those that need a prompt.
ARENA_POLICIES = ("learned", "window", "random", "key_norm", "delta_write", "h2o", "tova", "snapkv", "oracle")
PROMPT_POLICIES = ("snapkv",)
NO_PROMPT = tuple(p for p in ARENA_POLICIES if p not in PROMPT_POLICIES)
# New tokens of a passkey / needle answer, counted in each prompt length as RULER does: the 7-digit number and the
# space before it take 8 tokens of the byte tokenizer, fewer of a subword one.
ANSWER_TOKENS = 16
PROMPT_BATCH = 8  # prompts decoded together


class TaskMismatchError(Exception):
    """The task does not fit a checkpoint; the message says why and what fits."""


class ArenaTask:
    """One task of the arena. A subclass names its `metric` (the key of a row that the arena plots), whether
    `higher_is_better`, whether the metric is a `fraction` (shown in percent), and the `policies` it runs."""

    name: ClassVar[str]
    metric: ClassVar[str]
    label: ClassVar[str]  # the metric in words, for tables and axes
    higher_is_better: ClassVar[bool] = True
    fraction: ClassVar[bool] = True
    policies: ClassVar[tuple[str, ...]] = ARENA_POLICIES

    def __init__(self, window: int) -> None:
        self.window = window

    @property
    def length(self) -> int:
        """The longest sequence evaluated: where cache bytes are measured, and the buffer of a ceiling."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """The task's settings for the results JSON (with what `render` and `plot` read)."""
        return {"metric": self.metric, "label": self.label, "higher_is_better": self.higher_is_better,
                "fraction": self.fraction, "cache_length": self.length}  # fmt: skip

    def prepare(self, path: str) -> Any:
        """The inputs of checkpoint `path` (prompts or documents in its tokenizer); `TaskMismatchError` if it does not
        fit the task."""
        raise NotImplementedError

    def evaluate(self, model: Any, inputs: Any, policy: str) -> dict[str, Any]:
        """The numbers of one setting (the model's eviction already set to `policy`), including `metric`."""
        raise NotImplementedError

    @staticmethod
    def columns(info: dict[str, Any]) -> list[str]:
        """Headers of the task's columns in the printed table (from the task's `info` in the JSON)."""
        raise NotImplementedError

    @staticmethod
    def cells(row: dict[str, Any]) -> list[str]:
        """The task's cells of one result row."""
        raise NotImplementedError


def _tokenizer(path: str) -> Any | None:
    """The checkpoint's tokenizer (hlsa's byte tokenizer when it saved none, as `load_tokenizer` gives), or None when
    it saved none and the byte tokenizer has more ids than its vocabulary."""
    from hlsa.loading import TOKENIZER_FILES, load_tokenizer, read_config
    from hlsa.tokenizer import VOCAB_SIZE

    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES) and read_config(path).vocab_size < VOCAB_SIZE:
        return None
    return load_tokenizer(path)


def _text_tokenizer(path: str, what: str) -> Any:
    from hlsa.loading import is_text_tokenizer

    tokenizer = _tokenizer(path)
    if tokenizer is None:
        raise TaskMismatchError(
            f"it has no tokenizer for the English {what}; save the tokenizer it was trained with into it"
        )
    if not is_text_tokenizer(tokenizer):
        raise TaskMismatchError(
            f"its tokenizer is a closed vocabulary of {len(tokenizer)} symbols (a model of a synthetic task), which "
            f"cannot encode the English {what}; use a checkpoint trained on text"
        )
    return tokenizer


def beyond_window(result: dict[str, Any]) -> float:
    """Accuracy over the queries farther than the window (every bucket but the first), from `hlsa.demo.evaluate`."""
    names = list(result["accuracy"])[1:]
    queries = sum(result["queries"][b] for b in names)
    return sum(result["accuracy"][b] * result["queries"][b] for b in names) / max(queries, 1)


class Recall(ArenaTask):
    """The demo's multi-query associative recall, accuracy by query distance in units of the window."""

    name = "recall"
    metric = "beyond_window"
    label = "recall beyond W"
    policies = NO_PROMPT

    def __init__(self, recipe: dict[str, Any], window: int, examples: int) -> None:
        from hlsa import demo

        super().__init__(window)
        self.task, self.examples = demo.recipe_task(recipe), examples

    @property
    def length(self) -> int:
        return self.task.seq_len

    def info(self) -> dict[str, Any]:
        t = self.task
        return {"seq_len": t.seq_len, "num_pairs": t.num_pairs, "queries": t.num_queries, "examples": self.examples,
                **super().info()}  # fmt: skip

    def prepare(self, path: str) -> None:
        from hlsa.tokenizer import task_symbols

        # The ids are the task's, so the check is that the checkpoint's tokenizer gives every symbol its task id.
        symbols = task_symbols(self.task)
        tokenizer = _tokenizer(path)
        if tokenizer is None or tokenizer.convert_tokens_to_ids(symbols) != list(range(len(symbols))):
            raise TaskMismatchError(
                f"its tokenizer is not that of the recipe's MQAR task ({self.task.vocab} symbols k0.., v0.., f0..); "
                "recall needs a checkpoint trained on that task (hlsa demo --train), or the --recipe it was "
                "trained with"
            )

    def evaluate(self, model: Any, inputs: None, policy: str) -> dict[str, Any]:
        from hlsa import demo

        result = demo.evaluate(model, self.task, self.examples, self.window)
        return {**result, "beyond_window": beyond_window(result)}

    @staticmethod
    def columns(info: dict[str, Any]) -> list[str]:
        return ["recall", "recall > W"]

    @staticmethod
    def cells(row: dict[str, Any]) -> list[str]:
        return [f"{100 * row['overall']:.1f}%", f"{100 * row['beyond_window']:.1f}%"]


class _Retrieval(ArenaTask):
    """A RULER needle task (`niah_task`): greedy answers to prompts of each length x depth, `samples` per cell,
    scored by exact match (every reference value in the answer)."""

    niah_task: ClassVar[str]
    metric = "accuracy"
    label = "exact match"

    def __init__(self, window: int, lengths: list[int], depths: list[float], samples: int) -> None:
        super().__init__(window)
        self.lengths, self.depths, self.samples = sorted(set(lengths)), depths, samples

    @property
    def length(self) -> int:
        return self.lengths[-1]

    def info(self) -> dict[str, Any]:
        return {"niah_task": self.niah_task, "lengths": self.lengths, "depths": self.depths, "samples": self.samples,
                "answer_tokens": ANSWER_TOKENS, **super().info()}  # fmt: skip

    def prepare(self, path: str) -> tuple[Any, list[Any]]:
        from hlsa.eval import niah

        tokenizer = _text_tokenizer(path, f"{self.name} prompts")
        try:  # the prompts are those of `hlsa eval niah --seed 0`
            samples = niah.make_samples(
                [self.niah_task], tokenizer=tokenizer, lengths=self.lengths, depths=self.depths,
                num_samples=self.samples, tokens_to_generate=ANSWER_TOKENS, progress=False,
            )  # fmt: skip
        except UsageError as e:
            raise UsageError(f"--lengths, {self.name} on {path}: {e}") from None
        return tokenizer, samples

    def evaluate(self, model: Any, inputs: tuple[Any, list[Any]], policy: str) -> dict[str, Any]:
        from hlsa.eval import niah

        tokenizer, samples = inputs
        predictions = niah.generate_predictions(
            model, tokenizer, [s.prompt for s in samples], batch_size=PROMPT_BATCH, max_new_tokens=ANSWER_TOKENS,
            progress=False, use_cache=policy != "oracle",  # the oracle keeps every key: no cache to decode from
        )  # fmt: skip
        summary = niah.summarize(niah.score_samples(samples, predictions))[self.niah_task]
        by_length = {str(n): summary[str(n)]["exact"] for n in self.lengths}
        return {"accuracy": summary["exact"], "by_length": by_length, "prompts": summary["n"]}

    @staticmethod
    def columns(info: dict[str, Any]) -> list[str]:
        return ["exact match", *(f"@{n}" for n in info["lengths"])]

    @staticmethod
    def cells(row: dict[str, Any]) -> list[str]:
        return [f"{100 * row['accuracy']:.1f}%", *(f"{100 * a:.1f}%" for a in row["by_length"].values())]


class Passkey(_Retrieval):
    name = "passkey"
    niah_task = "niah_single_1"


class Needle(_Retrieval):
    name = "needle"
    niah_task = "niah_single_2"


class Perplexity(ArenaTask):
    """Perplexity of the first `documents` documents of `text` with more than W + 2 tokens, each cut to
    `block_size` tokens. Beyond the window are the tokens at positions >= W + 2: the query before such a token sees
    itself and W earlier tokens, so the document's first tokens (sinks apart) have left its window."""

    name = "ppl"
    metric = "beyond_window"
    label = "perplexity beyond W"
    higher_is_better = False
    fraction = False
    policies = NO_PROMPT

    def __init__(self, window: int, text: str, text_field: str, documents: int, block_size: int) -> None:
        super().__init__(window)
        self.text, self.text_field, self.documents, self.block_size = text, text_field, documents, block_size

    @property
    def length(self) -> int:
        return self.block_size

    def info(self) -> dict[str, Any]:
        return {"text": self.text, "documents": self.documents, "block_size": self.block_size, **super().info()}

    def prepare(self, path: str) -> tuple[Any, list[str]]:
        from hlsa.eval.ppl import iter_documents
        from hlsa.loading import tokenize

        tokenizer = _text_tokenizer(path, "documents")
        texts = []
        for text in iter_documents(self.text, text_field=self.text_field):
            if len(tokenize(tokenizer, text)["input_ids"]) > self.window + 2:
                texts.append(text)
            if len(texts) == self.documents:
                break
        if not texts:
            raise UsageError(
                f"--text {self.text}: no document has more than W + 2 = {self.window + 2} tokens in the tokenizer "
                f"of {path}, so none has a token beyond the window; pass longer documents"
            )
        return tokenizer, texts

    def evaluate(self, model: Any, inputs: tuple[Any, list[str]], policy: str) -> dict[str, Any]:
        from hlsa.eval.ppl import coarse_buckets, perplexity_by_position

        tokenizer, texts = inputs
        edge = self.window + 2  # buckets of this size put the window's boundary between two of them
        result = perplexity_by_position(
            model, tokenizer, iter(texts), block_size=self.block_size, bucket_size=edge, progress=False
        )
        within, beyond = coarse_buckets(result["buckets"], (0, edge, self.block_size))
        return {"overall": result["overall"]["ppl"], "beyond_window": beyond["ppl"], "within_window": within["ppl"],
                "tokens": {"within": within["tokens"], "beyond": beyond["tokens"]},
                "documents": result["documents"]}  # fmt: skip

    @staticmethod
    def columns(info: dict[str, Any]) -> list[str]:
        return ["ppl", "ppl > W"]

    @staticmethod
    def cells(row: dict[str, Any]) -> list[str]:
        return [f"{row['overall']:.2f}", f"{row['beyond_window']:.2f}"]


TASKS: dict[str, type[ArenaTask]] = {t.name: t for t in (Recall, Passkey, Needle, Perplexity)}
