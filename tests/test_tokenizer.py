"""The byte tokenizer: ids are bytes, specials are 256..258, text round-trips, saving/loading works offline."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from hlsa.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, byte_tokenizer


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return byte_tokenizer()


def test_ids_are_utf8_bytes(tok) -> None:  # noqa: ANN001
    text = "Aé€😀\x00\n\t<eos>"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))


def test_special_tokens(tok) -> None:  # noqa: ANN001
    assert len(tok) == VOCAB_SIZE == 259
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID) == (256, 257, 258)
    assert tok.padding_side == "left"
    assert tok.decode([BOS_ID, 104, 105, EOS_ID, PAD_ID], skip_special_tokens=True) == "hi"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_round_trip(text: str) -> None:
    tok = _cached_tokenizer()
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@functools.cache
def _cached_tokenizer():  # noqa: ANN202 - one tokenizer for all hypothesis examples
    return byte_tokenizer()


def test_left_padding(tok) -> None:  # noqa: ANN001
    enc = tok(["ab", "abcd"], padding=True)
    assert enc["input_ids"] == [[PAD_ID, PAD_ID, 97, 98], [97, 98, 99, 100]]
    assert enc["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_bos_option(tok) -> None:  # noqa: ANN001
    with_bos = byte_tokenizer(add_bos_token=True)
    assert with_bos("ab")["input_ids"] == [BOS_ID, 97, 98]
    assert with_bos("ab", add_special_tokens=False)["input_ids"] == [97, 98]
    assert tok("ab")["input_ids"] == [97, 98]


def test_save_and_auto_load_offline(tmp_path) -> None:  # noqa: ANN001
    byte_tokenizer(model_max_length=4096).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "naïve café ☕ <bos>"
    assert loaded(text)["input_ids"] == list(text.encode("utf-8"))
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.padding_side) == (
        256, 257, 258, "left",
    )  # fmt: skip
    assert loaded.model_max_length == 4096
    # lm-eval passes add_bos_token=True as a loading argument.
    assert AutoTokenizer.from_pretrained(tmp_path, add_bos_token=True)("a")["input_ids"] == [BOS_ID, 97]


def test_task_tokenizer_round_trips_mqar_and_passkey(tmp_path) -> None:  # noqa: ANN001
    from hlsa.tokenizer import task_symbols, task_tokenizer
    from hlsa.train.tasks import MQAR, Passkey

    for task in (MQAR(seq_len=64, vocab=256, num_pairs=4, num_queries=4), Passkey(seq_len=40, vocab=100)):
        tok = task_tokenizer(task)
        assert len(tok) == task.vocab and len(set(task_symbols(task))) == task.vocab
        ids = task.example(3, 0).input_ids.tolist()
        text = tok.decode(ids)
        assert tok(text)["input_ids"] == ids and tok.decode(tok(text)["input_ids"]) == text
        tok.save_pretrained(tmp_path / type(task).__name__)
        loaded = AutoTokenizer.from_pretrained(tmp_path / type(task).__name__, local_files_only=True)
        assert loaded(text)["input_ids"] == ids
    assert task_symbols(MQAR(seq_len=64))[:2] + task_symbols(MQAR(seq_len=64))[64:65] == ["k0", "k1", "v0"]
    assert task_symbols(Passkey(seq_len=40))[9:13] == ["9", "KEY", "QUERY", "f0"]
    with pytest.raises(Exception, match="Missing \\[UNK\\]"):  # no silent substitute for an unknown word
        task_tokenizer(MQAR(seq_len=64))("k1 hello")


def test_shipped_demo_checkpoints_carry_the_recipes_task_tokenizer() -> None:
    from pathlib import Path

    from hlsa.demo import DEFAULT_RECIPE, load_recipe, recipe_task
    from hlsa.tokenizer import task_tokenizer

    expected = task_tokenizer(recipe_task(load_recipe(DEFAULT_RECIPE))).get_vocab()
    for ckpt in sorted((Path(__file__).resolve().parents[1] / "checkpoints" / "demo").iterdir()):
        assert AutoTokenizer.from_pretrained(ckpt, local_files_only=True).get_vocab() == expected, ckpt
