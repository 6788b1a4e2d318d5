"""Synthetic retrieval tasks generated on the fly: multi-query associative recall (MQAR) and passkey retrieval.

Both are pure functions of `(seed, index)`, so a data position is just a counter (exact resume for free) and the
same examples can be regenerated for evaluation. Token ids live in `[0, vocab)`; the model's `vocab_size` must be
at least `vocab`. Labels are aligned with `input_ids` (the model shifts them) and are `-100` except where an
answer must be recalled, so the loss measures recall only.

MQAR (Zoology, Arora et al. 2023): key/value pairs `k v` are scattered through a sequence of random filler tokens;
later, a key reappears as a query and the model must emit its value at the next position. Keys are distinct within a
sequence. Unlike Zoology, pairs and queries are spread over the whole sequence, so the query distance (query
position minus pair position) covers everything from a few tokens to the full length: that is what separates a
sliding window from a model that keeps older tokens.

Passkey: a marker and a `digits`-token code at a random depth of filler text; at the end a query marker is
followed by the code again, which must be recalled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hlsa.errors import UsageError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One sequence: `input_ids, labels [T]` int64, and per answer token its position and query distance."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_pos: torch.Tensor  # [A] positions t whose label is an answer (predicted from position t - 1)
    distance: torch.Tensor  # [A] tokens between the fact and the query that recalls it


@dataclass(frozen=True)
class MQAR:
    """MQAR with `vocab` ids split into keys, values and filler (a quarter, a quarter, a half)."""

    seq_len: int
    vocab: int = 256
    num_pairs: int = 8
    num_queries: int = 8

    def __post_init__(self) -> None:
        if self.vocab < 16:
            raise UsageError(f"MQAR vocab must be >= 16 (got {self.vocab})")
        if self.num_pairs > self.vocab // 4:
            raise UsageError(f"num_pairs ({self.num_pairs}) must be <= vocab // 4 = {self.vocab // 4} (distinct keys)")
        if 2 * (self.num_pairs + self.num_queries) > self.seq_len:
            raise UsageError(
                f"seq_len ({self.seq_len}) is too short for {self.num_pairs} pairs and {self.num_queries} queries "
                f"(needs 2 * (pairs + queries) tokens)"
            )

    def example(self, seed: int, index: int) -> Example:
        rng = np.random.default_rng([seed, index])
        q = self.vocab // 4
        keys = rng.choice(q, size=self.num_pairs, replace=False)  # ids [0, q)
        values = q + rng.integers(0, q, size=self.num_pairs)  # ids [q, 2q)
        ids = rng.integers(2 * q, self.vocab, size=self.seq_len)  # filler [2q, vocab)
        labels = np.full(self.seq_len, IGNORE)
        # two-token slots; pairs anywhere but the last slot, queries in free slots after the first pair
        slots = self.seq_len // 2
        pair_slots = rng.choice(slots - 1, size=self.num_pairs, replace=False)
        free = np.setdiff1d(np.arange(pair_slots.min() + 1, slots), pair_slots)
        query_slots = np.sort(rng.choice(free, size=min(self.num_queries, len(free)), replace=False))
        for j, s in enumerate(pair_slots):
            ids[2 * s], ids[2 * s + 1] = keys[j], values[j]
        pos, dist = [], []
        for s in query_slots:
            before = np.flatnonzero(pair_slots < s)
            j = before[rng.integers(0, len(before))]
            ids[2 * s], ids[2 * s + 1] = keys[j], values[j]
            labels[2 * s + 1] = values[j]
            pos.append(2 * s + 1)
            dist.append(2 * (s - pair_slots[j]))
        return _example(ids, labels, pos, dist)


@dataclass(frozen=True)
class Passkey:
    """Passkey retrieval: ids `0..9` are digits, `10` the marker, `11` the query, `[12, vocab)` filler."""

    seq_len: int
    vocab: int = 256
    digits: int = 5

    def __post_init__(self) -> None:
        if self.vocab < 13:
            raise UsageError(f"passkey vocab must be >= 13 (got {self.vocab})")
        if 2 * (self.digits + 1) + 1 > self.seq_len:
            raise UsageError(f"seq_len ({self.seq_len}) is too short for a {self.digits}-digit passkey")

    def example(self, seed: int, index: int) -> Example:
        rng = np.random.default_rng([seed, index])
        k = self.digits
        code = rng.integers(0, 10, size=k)
        ids = rng.integers(12, self.vocab, size=self.seq_len)
        labels = np.full(self.seq_len, IGNORE)
        query = self.seq_len - (k + 1)
        depth = int(rng.integers(0, query - (k + 1) + 1))
        ids[depth], ids[depth + 1 : depth + 1 + k] = 10, code
        ids[query], ids[query + 1 :] = 11, code
        labels[query + 1 :] = code
        pos = list(range(query + 1, self.seq_len))
        return _example(ids, labels, pos, [query - depth] * k)


def _example(ids: np.ndarray, labels: np.ndarray, pos: list[int], dist: list[int]) -> Example:
    return Example(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        answer_pos=torch.tensor(pos, dtype=torch.int64),
        distance=torch.tensor(dist, dtype=torch.int64),
    )


def make_task(name: str, *, seq_len: int, vocab: int, num_pairs: int, num_queries: int, digits: int) -> MQAR | Passkey:
    """`mqar` or `passkey` by name (the part after `synthetic:` in `data.source`)."""
    if name == "mqar":
        return MQAR(seq_len=seq_len, vocab=vocab, num_pairs=num_pairs, num_queries=num_queries)
    if name == "passkey":
        return Passkey(seq_len=seq_len, vocab=vocab, digits=digits)
    raise UsageError(f"data.source: unknown synthetic task {name!r}; use synthetic:mqar or synthetic:passkey")
