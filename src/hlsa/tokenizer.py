"""A byte-level tokenizer that needs no download: ids 0..255 are the UTF-8 bytes, then three special tokens.

It is a plain `transformers.PreTrainedTokenizerFast` built with the `tokenizers` library, so `save_pretrained` and
`AutoTokenizer.from_pretrained(dir)` work offline and lm-eval can load it next to a checkpoint.

How it works: the `ByteLevel` pre-tokenizer maps every byte of the UTF-8 text to one printable character (GPT-2's
byte-to-unicode table) and the BPE model has exactly those 256 characters as its vocabulary and no merges, so each
byte becomes one token. Ids are assigned in byte order, so `id == byte value`. The `ByteLevel` decoder maps the
characters back to bytes, which makes `decode(encode(text)) == text` for any Unicode string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

NUM_BYTES = 256
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259


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
