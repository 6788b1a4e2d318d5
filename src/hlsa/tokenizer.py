"""Tokenizers that need no download: a byte-level one for text, and one per synthetic task's vocabulary.

The byte tokenizer: ids 0..255 are the UTF-8 bytes, then three special tokens.

It is a plain `transformers.PreTrainedTokenizerFast` built with the `tokenizers` library, so `save_pretrained` and
`AutoTokenizer.from_pretrained(dir)` work offline and lm-eval can load it next to a checkpoint.

How it works: the `ByteLevel` pre-tokenizer maps every byte of the UTF-8 text to one printable character (GPT-2's
byte-to-unicode table) and the BPE model has exactly those 256 characters as its vocabulary and no merges, so each
byte becomes one token. Ids are assigned in byte order, so `id == byte value`. The `ByteLevel` decoder maps the
characters back to bytes, which makes `decode(encode(text)) == text` for any Unicode string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:
    from hlsa.train.tasks import MQAR, Passkey

NUM_BYTES = 256
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259
BYTE = "byte"  # the byte tokenizer's name, for `--tokenizer` and `data.tokenizer`


def byte_tokenizer(*, add_bos_token: bool = False, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Build the byte tokenizer.

    Args:
        add_bos_token: prepend `<bos>` (id 257) when encoding with `add_special_tokens=True` (the default of
            `tokenizer(text)`). Off by default so that `decode(encode(text)) == text` holds without
            `skip_special_tokens`; lm-eval's `add_bos_token=True` model argument turns it on after loading.
        model_max_length: optional length limit recorded in the saved tokenizer config.

    Returns:
        A tokenizer with `len(tokenizer) == 259`, `pad/bos/eos_token_id == 256/257/258` and
        `padding_side == "left"` (generation pads on the left).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    # ByteLevel.alphabet() is the 256 printable stand-ins; ordering them by the byte they stand for gives id == byte.
    stand_in = {byte: char for byte, char in enumerate(_byte_to_char_table())}
    if set(stand_in.values()) != set(ByteLevel.alphabet()):
        raise RuntimeError("tokenizers' ByteLevel alphabet differs from the GPT-2 byte table this module assumes")
    vocab = {char: byte for byte, char in stand_in.items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    # use_regex=False: no word splitting, every byte stays one token; add_prefix_space=False keeps text exact.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # Added here, in this order, so that the ids are 256, 257, 258 (transformers would add them in its own order).
    backend.add_special_tokens([AddedToken(tok, special=True) for tok in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
        add_bos_token=add_bos_token,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        # A literal "<eos>" in the text is five bytes, not the special token: text always round-trips as bytes.
        split_special_tokens=True,
        **({} if model_max_length is None else {"model_max_length": model_max_length}),
    )
    ids = tokenizer.convert_tokens_to_ids([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN])
    if ids != [PAD_ID, BOS_ID, EOS_ID]:
        raise RuntimeError(f"special token ids are {ids}, expected {[PAD_ID, BOS_ID, EOS_ID]}")
    return tokenizer


def builtin_tokenizer(name: str | None, *, add_bos_token: bool = False) -> PreTrainedTokenizerFast | None:
    """The tokenizer `name` stands for without any file: hlsa's byte tokenizer for `BYTE` (the name `--tokenizer` and
    `data.tokenizer` accept besides a directory), built with `add_bos_token`; None for any other name, which is then
    a tokenizer to load."""
    return byte_tokenizer(add_bos_token=add_bos_token) if name == BYTE else None


def _byte_to_char_table() -> list[str]:
    """GPT-2's reversible byte -> printable character table (entry `b` stands for byte `b`).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to code points 256 and up, in byte
    order. This is the table `tokenizers`' ByteLevel pre-tokenizer applies.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, shifted = [], 0
    for byte in range(NUM_BYTES):
        if byte in printable:
            table.append(chr(byte))
        else:
            table.append(chr(NUM_BYTES + shifted))
            shifted += 1
    return table


def task_symbols(task: MQAR | Passkey) -> list[str]:
    """One readable symbol per token id of a synthetic task (`hlsa.train.tasks`), in id order.

    MQAR: keys `k0 k1 ...`, values `v0 v1 ...`, filler `f0 f1 ...` (each numbered within its group). Passkey: the
    digits `0`-`9`, then `KEY` (the marker before the code), `QUERY` (the marker before its recall), filler `f0 ...`.
    """
    from hlsa.train.tasks import MQAR, Passkey

    if isinstance(task, MQAR):  # ids: keys [0, q), values [q, 2q), filler [2q, vocab), q = vocab // 4
        q = task.vocab // 4
        groups = [("k", q), ("v", q), ("f", task.vocab - 2 * q)]
        return [f"{prefix}{i}" for prefix, count in groups for i in range(count)]
    if isinstance(task, Passkey):  # ids: digits [0, 10), marker 10, query 11, filler [12, vocab)
        return [str(d) for d in range(10)] + ["KEY", "QUERY"] + [f"f{i}" for i in range(task.vocab - 12)]
    raise TypeError(f"no symbols for task {type(task).__name__}; expected MQAR or Passkey")


def task_tokenizer(task: MQAR | Passkey) -> PreTrainedTokenizerFast:
    """A tokenizer of a synthetic task's own vocabulary: id `i` is the word `task_symbols(task)[i]`.

    Text is those symbols separated by whitespace; `decode` joins them with single spaces, so `encode(decode(ids))
    == ids` and `decode(encode(text)) == text` for text in that form. There are no special tokens (the models use
    every id of the task, `len(tokenizer) == task.vocab`) and no unknown token: a word outside the vocabulary is an
    error when encoding, never a silent substitute.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    symbols = task_symbols(task)
    backend = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(symbols)}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
