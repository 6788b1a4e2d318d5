"""Offline NIAH tasks: deterministic, sized in tokens, needle at the requested depth, RULER scoring."""

from __future__ import annotations

import functools
import re

import pytest

from hlsa.eval.haystack import NOISE_UNIT, essay_sentences, haystack_units
from hlsa.eval.niah import (
    TASKS,
    format_table,
    make_sample,
    make_samples,
    postprocess,
    score_samples,
    string_match_all,
    summarize,
)
from hlsa.tokenizer import byte_tokenizer


@functools.cache
def _tok():  # noqa: ANN202
    return byte_tokenizer()


class WordTokenizer:
    """A stand-in tokenizer (one token per whitespace-separated word) to check lengths are in *its* tokens."""

    def __call__(self, text: str) -> dict[str, list[str]]:
        return {"input_ids": text.split()}


def _haystack_depth(s) -> float:  # noqa: ANN001
    """Fraction of the haystack text (needle excluded) that precedes the needle."""
    haystack = (s.context_end - s.context_start) - (s.needle_end - s.needle_start)
    return (s.needle_start - s.context_start) / haystack


@pytest.mark.parametrize("task", sorted(TASKS))
def test_sample_structure(task: str) -> None:
    s = make_sample(task, tokenizer=_tok(), max_length=900, depth=40.0, index=3, seed=7, tokens_to_generate=32)
    assert s.length + 32 <= 900
    assert s.length + 32 > 900 - 200, "the haystack should fill the length budget (within one unit)"
    assert s.length == len(_tok()(s.prompt)["input_ids"])
    needle = s.input[s.needle_start : s.needle_end]
    assert needle.startswith("One of the special magic ") and s.outputs[0] in needle
    for value in s.outputs:
        assert s.input.count(value) == 1
    query_key = re.search(r"for (.+) is: ", needle).group(1)
    assert query_key in s.gen_prefix and s.prompt.endswith(s.gen_prefix)
    expected_answers = TASKS[task].get("num_values", 1) * TASKS[task].get("num_queries", 1)
    assert len(s.outputs) == expected_answers
    assert s.input.count("One of the special magic") >= TASKS[task].get("num_keys", 1) * TASKS[task].get(
        "num_values", 1
    )


def test_deterministic_per_seed() -> None:
    kw = {"tokenizer": _tok(), "lengths": [600], "depths": [10.0, 90.0], "num_samples": 2, "tokens_to_generate": 16}
    a = make_samples(["niah_single_2", "niah_multikey_3"], seed=1, **kw)
    b = make_samples(["niah_single_2", "niah_multikey_3"], seed=1, **kw)
    c = make_samples(["niah_single_2", "niah_multikey_3"], seed=2, **kw)
    assert a == b
    assert [s.input for s in a] != [s.input for s in c]
    assert len({s.outputs[0] for s in a}) == len(a), "samples of one run must differ"


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3"])
@pytest.mark.parametrize("depth", [0.0, 12.5, 50.0, 77.0, 100.0])
def test_needle_at_requested_depth(task: str, depth: float) -> None:
    s = make_sample(task, tokenizer=_tok(), max_length=3000, depth=depth, index=0, seed=0, tokens_to_generate=16)
    context = s.input[s.context_start : s.context_end]
    units = [u for u in re.split(r"(?<=\.)[ \n]+", context) if u]
    longest = max(len(u) for u in units) + 2  # insertion happens at unit boundaries
    haystack = (s.context_end - s.context_start) - (s.needle_end - s.needle_start)
    assert abs(_haystack_depth(s) - depth / 100) <= longest / haystack + 1e-9
    if depth == 0.0:
        assert s.needle_start == s.context_start
    if depth == 100.0:
        assert s.needle_end == s.context_end


def test_lengths_in_the_given_tokenizer() -> None:
    words = WordTokenizer()
    s = make_sample("niah_single_2", tokenizer=words, max_length=300, depth=50, index=0, seed=0, tokens_to_generate=20)
    assert len(s.prompt.split()) + 20 <= 300
    assert len(s.prompt.split()) + 20 > 300 - 40


def test_too_short_length_raises() -> None:
    with pytest.raises(ValueError, match="max_length"):
        make_sample("niah_single_1", tokenizer=_tok(), max_length=100, depth=0, index=0, seed=0, tokens_to_generate=8)
    with pytest.raises(ValueError, match="task"):
        make_sample("niah_nope", tokenizer=_tok(), max_length=900, depth=0, index=0, seed=0, tokens_to_generate=8)
    with pytest.raises(ValueError, match="depth"):
        make_sample("niah_single_1", tokenizer=_tok(), max_length=900, depth=101, index=0, seed=0, tokens_to_generate=8)


def test_haystacks() -> None:
    import random

    assert haystack_units("noise", 3, random.Random(0)) == [NOISE_UNIT] * 3
    essay = " ".join(essay_sentences(200, random.Random(0)))
    assert not re.search(r"\d", essay), "essay text must not contain digits (they would look like needle values)"
    assert essay_sentences(50, random.Random(5)) == essay_sentences(50, random.Random(5))
    needles = haystack_units("needle", 4, random.Random(0), value_kind="uuids")
    assert all(
        re.fullmatch(r"One of the special magic uuids for [0-9a-f-]{36} is: [0-9a-f-]{36}\.", n) for n in needles
    )


def test_string_match_all_follows_ruler() -> None:
    assert string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("ABCDEF-12", ["abcdef-12"]) == 1.0  # case-insensitive
    assert string_match_all("1111111 and 2222222", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert string_match_all("nothing", ["1234567"]) == 0.0
    assert postprocess("  12\x0034\n ") == "12\n34"
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_scoring_and_summary() -> None:
    samples = make_samples(
        ["niah_single_1", "niah_multivalue"], tokenizer=_tok(), lengths=[900, 1100], depths=[0.0, 100.0],
        tokens_to_generate=60,
    )  # fmt: skip
    # Perfect answers for the first task, half of the values for the second.
    preds = [" ".join(s.outputs if s.task == "niah_single_1" else s.outputs[:2]) for s in samples]
    records = score_samples(samples, preds)
    summary = summarize(records)
    assert summary["niah_single_1"]["partial"] == 1.0 and summary["niah_single_1"]["exact"] == 1.0
    assert summary["niah_multivalue"]["partial"] == 0.5 and summary["niah_multivalue"]["exact"] == 0.0
    assert summary["niah_single_1"]["1100"]["100"]["n"] == 1
    table = format_table(summary)
    assert "niah_multivalue" in table and "d=100" in table and "0.500" in table


def test_distractor_needles_avoid_the_query_keys() -> None:
    import random

    def keys(units: list[str]) -> set[str]:
        return {re.search(r"for (\S+) is:", u).group(1) for u in units}

    avoid = keys(haystack_units("needle", 20, random.Random(0)))
    units = haystack_units("needle", 300, random.Random(0), avoid_keys=avoid)
    assert len(units) == 300 and not keys(units) & avoid


def test_make_samples_progress(capsys: pytest.CaptureFixture) -> None:
    """A bar on stderr while the samples are sized (it can take minutes), nothing with progress=False."""
    kw = {"tokenizer": _tok(), "lengths": [480], "depths": [0.0, 100.0], "tokens_to_generate": 4}
    make_samples(["niah_single_1"], **kw)
    assert "niah samples" in capsys.readouterr().err
    make_samples(["niah_single_1"], progress=False, **kw)
    assert capsys.readouterr().err == ""
