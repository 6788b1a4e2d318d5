"""Training data: documents -> tokens -> fixed-length packed rows, or synthetic retrieval tasks.

`data.source` grammar (docs/training.md):

* `synthetic:mqar`, `synthetic:passkey` - generated on the fly (`hlsa.train.tasks`), no tokenizer;
* one or more local paths joined by `,`: `.txt` files (one document per file), `.jsonl` (one JSON object per line,
  text in `data.text_field`), `.parquet` (column `data.text_field`), or directories holding such files;
* anything else is a Hugging Face hub dataset name, streamed with `datasets` (imported lazily).

Packing: each document is `[bos] + tokens + [eos]` (where the tokenizer has them), documents are concatenated and cut
into rows of `seq_len` tokens; a document longer than a row simply continues in the next one. Under data
parallelism document `i` belongs to rank `i % world`. A stream's position (`state_dict`) is the number of documents
read, the epoch and the leftover tokens, so resuming re-reads (without re-tokenizing) the skipped documents and
then continues exactly.

`resume(states)` takes the positions of every rank of the run that wrote the checkpoint. With as many ranks as
before, each rank continues exactly. With a different number of ranks, synthetic tasks still continue exactly (the
examples used so far are a prefix of the example indices), while packed text restarts every rank at the earliest
document that some old rank had not yet fully emitted: nothing is skipped, and the documents after it that other
ranks had already used are seen again (the returned note says how many).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from hlsa.errors import UsageError, check_readable_file
from hlsa.train.tasks import make_task

SUFFIXES = (".txt", ".jsonl", ".parquet")
SYNTHETIC = "synthetic:"


class DataExhaustedError(Exception):
    """A stream that is read once (`data.repeat = false`, hub datasets) has no more rows."""


class TaskStream:
    """Batches of a synthetic task; row `r` of batch `b` on rank `k` is example `start + (b * world + k) * B + r`.

    `start` counts the examples used before the current layout of ranks (non-zero after resuming with a different
    number of ranks); all ranks draw batches in lockstep, so the examples used so far are always a prefix.
    """

    def __init__(self, task: Any, *, seed: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.task, self.seed, self.batch_size, self.rank, self.world = task, seed, batch_size, rank, world
        self.start, self.batches = 0, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        first = self.start + (self.batches * self.world + self.rank) * self.batch_size
        rows = [self.task.example(self.seed, first + r) for r in range(self.batch_size)]
        self.batches += 1
        return {
            "input_ids": torch.stack([e.input_ids for e in rows]),
            "labels": torch.stack([e.labels for e in rows]),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "batches": self.batches, "stride": self.world * self.batch_size}

    def resume(self, states: list[dict[str, Any]]) -> str | None:
        """Continue after the examples that the ranks whose `state_dict`s these are have used (any number of ranks,
        any batch size before): exact in every case, so there is nothing to report."""
        # `stride` is absent from checkpoints written before resharding existed: those used this batch size.
        used = min(int(s.get("start", 0)) + int(s["batches"]) * int(s.get("stride", len(states) * self.batch_size))
                   for s in states)  # fmt: skip
        self.start, self.batches = used, 0
        return None


class PackedText:
    """Packs the documents of `open_docs()` (a fresh iterator per epoch) into `[B, seq_len]` rows for one rank."""

    def __init__(
        self,
        open_docs: Callable[[], Iterator[str]],
        encode: Callable[[str], list[int]],
        *,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        repeat: bool = True,
        name: str = "data",
    ) -> None:
        if seq_len < 2:
            raise UsageError(f"data.seq_len must be >= 2 (got {seq_len})")
        self.open_docs, self.encode, self.name = open_docs, encode, name
        self.seq_len, self.batch_size, self.rank, self.world, self.repeat = seq_len, batch_size, rank, world, repeat
        self.epoch, self.doc, self.buffer = 0, 0, []
        # [document index, tokens] runs making up `buffer`, oldest first: where a resharded resume must restart
        self.buffer_docs: list[list[int]] = []
        self._docs: Iterator[str] | None = None
        self._full_pass, self._found = True, False

    def _open(self) -> Iterator[str]:
        """The document iterator positioned after the first `self.doc` documents of this epoch."""
        docs = self.open_docs()
        if self.doc:
            from tqdm.auto import tqdm

            # Document streams cannot seek: a resumed epoch reads (a hub stream downloads) the documents it used again.
            skip = tqdm(range(self.doc), desc=f"resume: skipping used documents of {self.name}", unit="doc",
                        disable=self.rank != 0 or self.doc < 1000, leave=False)  # fmt: skip
            for _ in skip:
                next(docs)
        return docs

    def _next_doc_tokens(self) -> list[int]:
        while True:
            if self._docs is None:
                self._full_pass, self._found = self.doc == 0, False
                self._docs = self._open()
            for text in self._docs:
                self.doc += 1
                if (self.doc - 1) % self.world == self.rank:
                    ids = self.encode(text)
                    if ids:
                        self._found = True
                        return ids
            # A whole pass without a token for this rank would loop forever: empty files, or fewer docs than ranks.
            if self._full_pass and not self._found:
                raise UsageError(
                    f"{self.name}: no text for rank {self.rank} of {self.world} (empty files, or fewer documents "
                    "than ranks); give data.source with more text"
                )
            if not self.repeat:
                raise DataExhaustedError(f"{self.name}: end of data after epoch {self.epoch}")
            self.epoch, self.doc, self._docs = self.epoch + 1, 0, None

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            while len(self.buffer) < self.seq_len:
                ids = self._next_doc_tokens()
                self.buffer.extend(ids)
                self.buffer_docs.append([self.doc - 1, len(ids)])
            rows.append(self.buffer[: self.seq_len])
            self.buffer = self.buffer[self.seq_len :]
            self._drop_emitted(self.seq_len)
        ids = torch.tensor(rows, dtype=torch.int64)
        return {"input_ids": ids, "labels": ids.clone()}

    def _drop_emitted(self, n: int) -> None:
        while n > 0:
            run = self.buffer_docs[0]
            take = min(n, run[1])
            run[1] -= take
            n -= take
            if run[1] == 0:
                self.buffer_docs.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "doc": self.doc, "buffer": list(self.buffer), "buffer_docs": self.buffer_docs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.doc, self.buffer = int(state["epoch"]), int(state["doc"]), list(state["buffer"])
        self.buffer_docs = _buffer_runs(state)
        self._docs = None

    def resume(self, states: list[dict[str, Any]]) -> str | None:
        """Continue after a run whose ranks had these `state_dict`s: exactly with as many ranks as before, else from
        the earliest document not yet fully emitted by its rank (returns a note saying how many may repeat)."""
        if len(states) == self.world:
            self.load_state_dict(states[self.rank])
            return None

        def unfinished(s: dict[str, Any]) -> tuple[int, int]:  # (epoch, first document this rank has not emitted)
            runs = _buffer_runs(s)
            return int(s["epoch"]), runs[0][0] if runs else int(s["doc"])

        epoch, doc = min(unfinished(s) for s in states)
        furthest = max((int(s["epoch"]), int(s["doc"])) for s in states)
        self.epoch, self.doc, self.buffer, self.buffer_docs, self._docs = epoch, doc, [], [], None
        again = furthest[1] - doc if furthest[0] == epoch else "an epoch's worth of"
        return (
            f"{self.name}: resharded from {len(states)} to {self.world} ranks; restarting at document {doc} of epoch "
            f"{epoch}, so up to {again} documents already used by some ranks are read again"
        )


def _buffer_runs(state: dict[str, Any]) -> list[list[int]]:
    """The `[document index, tokens]` runs of a saved buffer; checkpoints written before they were recorded get
    their whole leftover attributed to the last document read."""
    legacy = [[int(state["doc"]) - 1, len(state["buffer"])]] if state["buffer"] else []
    return [[int(d), int(n)] for d, n in state.get("buffer_docs", legacy)]


# ---------------------------------------------------------------------------------------------------- sources
def local_files(source: str) -> list[Path] | None:
    """The files named by `source` (paths joined by ','), or None when `source` does not look like local paths."""
    parts = [p.strip() for p in source.split(",") if p.strip()]
    looks_local = any(Path(p).exists() or Path(p).suffix in SUFFIXES or p.startswith((".", "/", "~")) for p in parts)
    if not looks_local:
        return None
    files: list[Path] = []
    for p in parts:
        path = Path(p).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file())
            if not found:
                raise UsageError(f"data.source: directory {p!r} holds no {'/'.join(SUFFIXES)} files")
            files.extend(found)
        else:
            files.append(path)
            if path.is_file() and path.suffix not in SUFFIXES:
                raise UsageError(f"data.source: {p!r} has suffix {path.suffix!r}; supported are {SUFFIXES}")
    for f in files:  # now, not when the stream reaches the file mid-run
        check_readable_file(f, "a data.source file", fix="check the path, or name a hub dataset")
    return files


def iter_local(files: list[Path], text_field: str) -> Iterator[str]:
    """Documents of local files, in order."""
    for path in files:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path, text_field)
        else:
            yield from _iter_parquet(path, text_field)


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{n}: expected a JSON object with a {text_field!r} field, got {line[:60]!r}")
            if text_field not in row:
                raise UsageError(f"{path}:{n}: no field {text_field!r}; set data.text_field to the text column")
            yield _text(row[text_field], f"{path}:{n}: field {text_field!r}")


def _text(value: Any, where: str) -> str:
    """`value` when it is a string: a null or a number would otherwise be trained as the text "None" or "123"."""
    if not isinstance(value, str):
        raise UsageError(
            f"{where} is {json.dumps(value, default=repr)[:60]}, not a string; fix the record or set data.text_field "
            "to the text column"
        )
    return value


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise UsageError(f"{path}: no column {text_field!r} (has {pf.schema_arrow.names}); set data.text_field")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UsageError(f"{path}: column {text_field!r} holds {kind}, not strings; set data.text_field")
    for batch in pf.iter_batches(columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)  # a null cell is a missing document


def open_hub(name: str, *, config: str, split: str, text_field: str) -> Callable[[], Iterator[str]]:
    """A factory of document iterators over a streamed hub dataset; fails now (not mid-run) on a bad name."""
    try:
        import datasets
    except ImportError as e:
        raise UsageError(
            f"data.source {name!r} is not a local file, so it would be a hub dataset, which needs the `datasets` "
            "package: pip install 'hlsa[train]'"
        ) from e
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError) as e:  # DatasetNotFoundError is a FileNotFoundError
        raise UsageError(
            f"data.source: cannot open hub dataset {name!r} (config {config or None!r}, split {split!r}): {e}. "
            "Check the name, or pass a local .txt/.jsonl/.parquet path"
        ) from e

    def docs() -> Iterator[str]:
        for row in ds:
            if text_field not in row:
                raise UsageError(f"hub dataset {name!r} has no column {text_field!r}; set data.text_field")
            yield _text(row[text_field], f"hub dataset {name!r}: column {text_field!r}")

    return docs


def load_text_tokenizer(name: str) -> Any:
    """`data.tokenizer`: "byte" (hlsa's, offline) or a HF tokenizer directory or hub name. The byte tokenizer is built
    to put `<bos>` before a prompt, as every training document starts with it; the same object is saved with
    checkpoints."""
    from transformers import AutoTokenizer

    from hlsa.tokenizer import builtin_tokenizer

    builtin = builtin_tokenizer(name, add_bos_token=True)
    if builtin is not None:
        return builtin
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:  # not a directory and no hub access (offline), a bad name or a bad directory
        where = "a directory without a usable tokenizer" if Path(name).is_dir() else "not a local directory"
        raise UsageError(
            f"data.tokenizer {name!r} cannot be loaded: it is {where}, and as a hub name it failed "
            f'({str(e).splitlines()[0] if str(e) else e.__class__.__name__}). Pass "byte" (built in), a local '
            "directory holding a tokenizer (saved by save_pretrained), or a hub name while online"
        ) from None


def make_encoder(tok: Any) -> Callable[[str], list[int]]:
    """`encode(text) = [bos] + ids + [eos]` with the tokenizer's specials (when it has them)."""
    head = [] if tok.bos_token_id is None else [tok.bos_token_id]
    tail = [] if tok.eos_token_id is None else [tok.eos_token_id]

    def encode(text: str) -> list[int]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return head + ids + tail if ids else []

    return encode


def build_stream(opts: Any, *, seed: int, rank: int = 0, world: int = 1) -> tuple[TaskStream | PackedText, int, Any]:
    """The training stream for `opts` (a `DataOptions`), the vocabulary size it needs, and its tokenizer (for a
    synthetic task, one whose words are the task's own symbols: `hlsa.tokenizer.task_tokenizer`)."""
    src = opts.source.strip()
    if not src:
        raise UsageError("data.source is empty; pass --data PATH, a hub dataset name, or synthetic:mqar")
    if src.startswith(SYNTHETIC):
        task = make_task(
            src[len(SYNTHETIC) :],
            seq_len=opts.seq_len,
            vocab=opts.task_vocab,
            num_pairs=opts.num_pairs,
            num_queries=opts.num_queries,
            digits=opts.passkey_digits,
        )
        from hlsa.tokenizer import task_tokenizer

        stream = TaskStream(task, seed=seed, batch_size=opts.batch_size, rank=rank, world=world)
        return stream, opts.task_vocab, task_tokenizer(task)
    files = local_files(src)
    if files is not None:

        def open_docs() -> Iterator[str]:
            return iter_local(files, opts.text_field)

        repeat = opts.repeat
    else:
        open_docs = open_hub(src, config=opts.hub_config, split=opts.split, text_field=opts.text_field)
        repeat = False
    tokenizer = load_text_tokenizer(opts.tokenizer)
    stream = PackedText(
        open_docs,
        make_encoder(tokenizer),
        seq_len=opts.seq_len,
        batch_size=opts.batch_size,
        rank=rank,
        world=world,
        repeat=repeat,
        name=src,
    )
    return stream, len(tokenizer), tokenizer
