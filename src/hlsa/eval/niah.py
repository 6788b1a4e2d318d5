"""Offline RULER-style needle-in-a-haystack (NIAH) tasks: generation, scoring and a greedy-decoding runner.

The tasks follow RULER's S-NIAH/MK-NIAH definitions (Hsieh et al. 2024, and lm-eval's `ruler` tasks):

| task | haystack | needle keys | values | needles in text | queried |
|---|---|---|---|---|---|
| niah_single_1 | noise paragraph, repeated | words | 7-digit numbers | 1 | 1 |
| niah_single_2 | essay | words | numbers | 1 | 1 |
| niah_single_3 | essay | words | UUIDs | 1 | 1 |
| niah_multikey_1 | essay | words | numbers | 4 (3 distractor keys) | 1 |
| niah_multikey_2 | distractor needles | words | numbers | 1 + haystack | 1 |
| niah_multikey_3 | distractor needles | UUIDs | UUIDs | 1 + haystack | 1 |
| niah_multivalue | essay | words | numbers | 4 values of one key | 1 key, 4 answers |
| niah_multiquery | essay | words | numbers | 4 | 4 keys |

Differences from RULER: the essays are generated (`haystack.py`) instead of downloaded; the needle of the first
queried key sits at the requested depth (percent of the haystack, at a haystack-unit boundary) so that accuracy can be
tabulated by length x depth; other needles sit at seeded random depths. Lengths are in tokens of the given tokenizer
and include the generation budget, as in RULER: `len(prompt) + tokens_to_generate <= length`.

Scoring is RULER's `string_match_all`: the fraction of reference values found (case-insensitively) in the
prediction. `partial` is that fraction, `exact` is 1 when every value was found.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from hlsa.errors import UsageError
from hlsa.eval.haystack import NEEDLE, haystack_units, join_units, random_key, random_value

if TYPE_CHECKING:  # torch loads when a model runs: `hlsa eval --help` lists TASKS without it
    import torch

TASKS: dict[str, dict[str, Any]] = {
    "niah_single_1": {"haystack": "noise", "values": "numbers"},
    "niah_single_2": {"haystack": "essay", "values": "numbers"},
    "niah_single_3": {"haystack": "essay", "values": "uuids"},
    "niah_multikey_1": {"haystack": "essay", "values": "numbers", "num_keys": 4},
    "niah_multikey_2": {"haystack": "needle", "values": "numbers"},
    "niah_multikey_3": {"haystack": "needle", "values": "uuids", "keys": "uuids"},
    "niah_multivalue": {"haystack": "essay", "values": "numbers", "num_values": 4},
    "niah_multiquery": {"haystack": "essay", "values": "numbers", "num_keys": 4, "num_queries": 4},
}
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)


@dataclass(frozen=True)
class NiahSample:
    """One prompt. `prompt` = `input` + " " + `gen_prefix` is what the model continues.

    `needle_start`/`needle_end` are character offsets in `input` of the needle of the first queried key;
    `context_start`/`context_end` delimit the haystack (needles included) in `input`.
    """

    task: str
    index: int
    max_length: int
    depth: float
    input: str
    gen_prefix: str
    outputs: list[str]
    length: int
    needle_start: int
    needle_end: int
    context_start: int
    context_end: int

    @property
    def prompt(self) -> str:
        return f"{self.input} {self.gen_prefix}"


def _spec(task: str) -> dict[str, Any]:
    if task not in TASKS:
        raise UsageError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return {"keys": "words", "num_keys": 1, "num_values": 1, "num_queries": 1, **TASKS[task]}


def _draw_needles(spec: dict[str, Any], rng: random.Random) -> tuple[list[str], list[list[str]]]:
    """Distinct keys and their values (`values[k]` has `num_values` entries)."""
    keys: list[str] = []
    while len(keys) < spec["num_keys"]:
        key = random_key(rng) if spec["keys"] == "words" else random_value(spec["keys"], rng)
        if key not in keys:
            keys.append(key)
    values = [[random_value(spec["values"], rng) for _ in range(spec["num_values"])] for _ in keys]
    return keys, values


def _texts(spec: dict[str, Any], queries: list[str], num_answers: int) -> tuple[str, str, str]:
    """(prompt head, question, generation prefix), singular when a single value is asked for (as RULER)."""
    kind = spec["values"]
    one = kind[:-1]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    if num_answers == 1:
        head = (
            f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {one} afterwards."
        )
        question = f"What is the special magic {one} for {query} mentioned in the provided text?"
        return head, question, f"The special magic {one} for {query} mentioned in the provided text is"
    head = (
        f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards."
    )
    question = f"What are all the special magic {kind} for {query} mentioned in the provided text?"
    return head, question, f"The special magic {kind} for {query} mentioned in the provided text are"


class _Builder:
    """Everything of one sample except the haystack size; `build(n)` assembles the text with `n` haystack units."""

    def __init__(self, task: str, depth: float, rng: random.Random) -> None:
        self.spec = spec = _spec(task)
        keys, values = _draw_needles(spec, rng)
        self.keys = frozenset(keys)
        self.needles = [
            (k, NEEDLE.format(kind=spec["values"], key=key, value=v)) for k, key in enumerate(keys) for v in values[k]
        ]
        # The first needle (first key, first value) goes to the requested depth; the others to random depths.
        self.depths = [depth / 100.0] + [rng.random() for _ in self.needles[1:]]
        queries = keys[: spec["num_queries"]]
        self.answers = [v for k in range(spec["num_queries"]) for v in values[k]]
        self.head, self.question, self.gen_prefix = _texts(spec, queries, len(self.answers))
        self.rng = rng
        self.units: list[str] = []

    def units_prefix(self, n: int) -> list[str]:
        # Extending the same rng stream keeps every prefix identical, whatever the final size.
        if n > len(self.units):
            kind, values = self.spec["haystack"], self.spec["values"]
            self.units += haystack_units(kind, n - len(self.units), self.rng, value_kind=values, avoid_keys=self.keys)
        return self.units[:n]

    def build(self, n: int) -> tuple[str, int, int, int, int]:
        """Returns (input text, needle start, needle end, context start, context end) in characters."""
        units = list(self.units_prefix(n))
        # Needle slots are the unit boundaries closest to each depth, measured in characters of the haystack.
        ends = list(itertools.accumulate(len(u) + 1 for u in units))
        bounds = [0] + ends
        total = bounds[-1]
        slots = [min(range(n + 1), key=lambda j, d=d: abs(bounds[j] - d * total)) for d in self.depths]
        # Insert from the back so earlier slots keep their index; at equal slots the first needle ends up first.
        order = sorted(range(len(self.needles)), key=lambda i: (slots[i], i), reverse=True)
        for i in order:
            units.insert(slots[i], self.needles[i][1])
        context = join_units(self.spec["haystack"], units)
        prefix = f"{self.head}\n"
        text = f"{prefix}{context}\n{self.question}"
        start = text.index(self.needles[0][1], len(prefix))
        return text, start, start + len(self.needles[0][1]), len(prefix), len(prefix) + len(context)


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def make_sample(
    task: str, *, tokenizer: Any, max_length: int, depth: float, index: int, seed: int, tokens_to_generate: int
) -> NiahSample:
    """Generate one sample whose prompt plus `tokens_to_generate` fits `max_length` tokens (as large as fits).

    Deterministic in `(seed, task, max_length, depth, index)`.
    """
    if not 0.0 <= depth <= 100.0:
        raise UsageError(f"depth must be a percentage in [0, 100], got {depth}")
    rng = random.Random(f"hlsa-niah/{seed}/{task}/{max_length}/{depth:g}/{index}")
    builder = _Builder(task, depth, rng)

    def fits(n: int) -> bool:
        text = builder.build(n)[0]
        return _token_count(tokenizer, f"{text} {builder.gen_prefix}") + tokens_to_generate <= max_length

    if not fits(1):
        raise UsageError(
            f"max_length={max_length} leaves no room for the {task} prompt and tokens_to_generate="
            f"{tokens_to_generate}; raise the length or lower tokens_to_generate"
        )
    lo, hi = 1, 2
    while fits(hi):  # exponential then binary search for the largest haystack that fits
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    text, n_start, n_end, c_start, c_end = builder.build(lo)
    length = _token_count(tokenizer, f"{text} {builder.gen_prefix}")
    return NiahSample(
        task, index, max_length, float(depth), text, builder.gen_prefix, builder.answers, length,
        n_start, n_end, c_start, c_end,
    )  # fmt: skip


def make_samples(
    tasks: Sequence[str],
    *,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    num_samples: int = 1,
    seed: int = 0,
    tokens_to_generate: int = 128,
    progress: bool = True,
) -> list[NiahSample]:
    """All samples for every task x length x depth x index (`num_samples` per cell).

    `progress` shows a bar on stderr: sizing a prompt tokenizes it at every step of a search over haystack sizes,
    which adds up to minutes for many samples at long lengths.
    """
    from tqdm.auto import tqdm

    cells = list(itertools.product(tasks, lengths, depths, range(num_samples)))
    return [
        make_sample(task, tokenizer=tokenizer, max_length=n, depth=d, index=i, seed=seed,
                    tokens_to_generate=tokens_to_generate)
        for task, n, d, i in tqdm(cells, desc="niah samples", unit="sample", disable=not progress)
    ]  # fmt: skip


_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's cleanup: strip, turn control characters into newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of `references` that occur in `prediction`, case-insensitive (RULER's per-sample score)."""
    if not references:
        raise UsageError("references must not be empty")
    pred = postprocess(prediction).lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def generate_predictions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
    use_cache: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts`, batched with left padding (prompts sorted by length to pad little).

    Returns the decoded new text of each prompt, in the order of `prompts`. `progress` shows a bar of batches on
    stderr (longest prompts first, so the first batches are the slowest). `use_cache=False` computes every new
    token by a full forward over the whole sequence instead of decoding from a cache: the `oracle` eviction
    reference has no cache to decode from.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    out: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        starts = range(0, len(order), batch_size)
        for b in tqdm(starts, desc="niah generate", unit="batch", disable=not progress):
            idx = order[b : b + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                gen = model.generate(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=use_cache,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            for i, row in zip(idx, new):
                out[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def score_samples(samples: list[NiahSample], predictions: list[str]) -> list[dict[str, Any]]:
    """One record per sample: its task/length/depth, the prediction and its `partial`/`exact` scores."""
    records = []
    for s, pred in zip(samples, predictions, strict=True):
        partial = string_match_all(pred, s.outputs)
        records.append(
            {"task": s.task, "max_length": s.max_length, "depth": s.depth, "index": s.index, "length": s.length,
             "outputs": s.outputs, "prediction": pred, "partial": partial, "exact": float(partial == 1.0)}
        )  # fmt: skip
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean `partial`/`exact` by task, by task x length, and by task x length x depth (keys are strings)."""
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        for key in (
            (r["task"],),
            (r["task"], str(r["max_length"])),
            (r["task"], str(r["max_length"]), f"{r['depth']:g}"),
        ):
            cells[key].append(r)
    summary: dict[str, Any] = {}
    for key, rs in sorted(cells.items()):
        node = summary
        for part in key:
            node = node.setdefault(part, {})
        node["partial"] = sum(r["partial"] for r in rs) / len(rs)
        node["exact"] = sum(r["exact"] for r in rs) / len(rs)
        node["n"] = len(rs)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """A text table per task: rows are lengths, columns depths, cells the mean `partial` score."""
    lines = []
    for task, by_len in summary.items():
        lengths = [k for k in by_len if k.isdigit()]
        depths = sorted({d for n in lengths for d in by_len[n] if d not in ("partial", "exact", "n")}, key=float)
        lines.append(f"{task}  (partial score; exact in brackets)  overall {by_len['partial']:.3f}")
        lines.append("length  " + "".join(f"{'d=' + d:>10}" for d in depths) + f"{'all':>14}")
        for n in sorted(lengths, key=int):
            row = by_len[n]
            cells = "".join(f"{row[d]['partial']:>10.3f}" if d in row else f"{'-':>10}" for d in depths)
            lines.append(f"{n:>6}  {cells}{row['partial']:>7.3f} ({row['exact']:.3f})")
        lines.append("")
    return "\n".join(lines)


def sample_to_json(sample: NiahSample) -> dict[str, Any]:
    """A JSON-able dict of the sample (RULER's field names `input`, `outputs`, `length`, `max_length`, ...)."""
    return asdict(sample)
