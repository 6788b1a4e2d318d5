"""Data: synthetic tasks, local files, packing, resume positions and the error cases."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from hlsa.train.data import DataExhaustedError, PackedText, TaskStream, build_stream, local_files
from hlsa.train.options import DataOptions
from hlsa.train.tasks import IGNORE, MQAR, Passkey, make_task


def test_mqar_answers_are_the_values_of_earlier_pairs() -> None:
    task = MQAR(seq_len=96, vocab=64, num_pairs=6, num_queries=5)
    for index in range(20):
        ex = task.example(seed=3, index=index)
        ids, labels = ex.input_ids, ex.labels
        assert ids.shape == labels.shape == (96,) and int(ids.max()) < 64
        assert ((labels != IGNORE).nonzero().flatten() == ex.answer_pos).all()
        for pos, dist in zip(ex.answer_pos.tolist(), ex.distance.tolist(), strict=True):
            key, value = int(ids[pos - 1]), int(labels[pos])
            assert key < 16 and 16 <= value < 32 and int(ids[pos]) == value
            # the fact sits `dist` tokens earlier: the same key followed by the same value
            assert int(ids[pos - 1 - dist]) == key and int(ids[pos - dist]) == value
    again = task.example(seed=3, index=7)
    assert torch.equal(again.input_ids, task.example(seed=3, index=7).input_ids)
    assert not torch.equal(again.input_ids, task.example(seed=4, index=7).input_ids)


def test_passkey_layout() -> None:
    ex = Passkey(seq_len=40, vocab=32, digits=4).example(seed=0, index=1)
    code = ex.input_ids[-4:]
    assert int(ex.input_ids[-5]) == 11 and (ex.labels[-4:] == code).all() and (ex.labels[:-4] == IGNORE).all()
    depth = 35 - int(ex.distance[0])
    assert int(ex.input_ids[depth]) == 10 and torch.equal(ex.input_ids[depth + 1 : depth + 5], code)


def test_task_errors() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        MQAR(seq_len=10, num_pairs=4, num_queries=4)
    with pytest.raises(ValueError, match="num_pairs"):
        MQAR(seq_len=512, vocab=32, num_pairs=9)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("copy", seq_len=8, vocab=16, num_pairs=1, num_queries=1, digits=1)


def test_task_stream_ranks_partition_the_examples() -> None:
    task = MQAR(seq_len=32, vocab=64, num_pairs=2, num_queries=2)
    single = TaskStream(task, seed=0, batch_size=2)
    ranks = [TaskStream(task, seed=0, batch_size=1, rank=r, world=2) for r in range(2)]
    whole = single.next_batch()["input_ids"]
    assert torch.equal(torch.cat([r.next_batch()["input_ids"] for r in ranks]), whole)


def byte_opts(source: str, **over: object) -> DataOptions:
    return DataOptions(**{"source": source, "tokenizer": "byte", "seq_len": 8, "batch_size": 2, **over})


def test_long_document_spans_rows_and_short_ones_pack(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x" * 30)
    (tmp_path / "b.txt").write_text("yz")
    stream, vocab, tokenizer = build_stream(byte_opts(str(tmp_path)), seed=0)
    assert vocab == 259 and tokenizer("hi")["input_ids"] == [257, ord("h"), ord("i")]  # saved to put <bos> first
    rows = torch.cat([stream.next_batch()["input_ids"] for _ in range(3)])  # 48 tokens: 32 of a, 4 of b, 12 of a
    flat = rows.flatten().tolist()
    assert flat[:32] == [257] + [ord("x")] * 30 + [258]
    assert flat[32:36] == [257, ord("y"), ord("z"), 258]
    assert flat[36:38] == [257, ord("x")]  # second epoch


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "hello"}) + "\n\n" + json.dumps({"body": "you"}) + "\n")
    pq.write_table(pa.table({"body": ["abc"]}), tmp_path / "e.parquet")
    stream, _, _ = build_stream(byte_opts(f"{tmp_path}/d.jsonl,{tmp_path}/e.parquet", text_field="body"), seed=0)
    flat = stream.next_batch()["input_ids"].flatten().tolist()
    assert bytes(t for t in flat if t < 256) == b"helloyouabc"
    with pytest.raises(ValueError, match="no field 'text'"):
        build_stream(byte_opts(f"{tmp_path}/d.jsonl"), seed=0)[0].next_batch()


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    stream, _, _ = build_stream(byte_opts(str(tmp_path / "empty.txt")), seed=0)
    with pytest.raises(ValueError, match="no text"):
        stream.next_batch()
    with pytest.raises(ValueError, match=r"missing\.jsonl: no such file .*check the path, or name a hub dataset"):
        build_stream(byte_opts(str(tmp_path / "missing.jsonl")), seed=0)
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "x.csv").write_text("a")
        local_files(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="data.source is empty"):
        build_stream(byte_opts(""), seed=0)


def test_read_once_stream_ends(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdefghijklmn")  # 16 tokens: one batch of 2 x 8
    stream, _, _ = build_stream(byte_opts(str(tmp_path / "a.txt"), repeat=False), seed=0)
    stream.next_batch()
    with pytest.raises(DataExhaustedError):
        stream.next_batch()


def test_unknown_hub_dataset_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub lookup is replaced by one that fails like `datasets` does for a missing repo (no network)."""
    fake = types.ModuleType("datasets")

    def load_dataset(name: str, config: str | None, *, split: str, streaming: bool) -> None:
        assert streaming
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match="cannot open hub dataset 'nobody/no-such-set'"):
        build_stream(byte_opts("nobody/no-such-set"), seed=0)


def test_packed_text_resumes_exactly() -> None:
    docs = [f"document number {i} " * (i % 3 + 1) for i in range(7)]

    def make(rank: int = 0, world: int = 1) -> PackedText:
        return PackedText(
            lambda: iter(docs),
            lambda t: [ord(c) for c in t] + [0],
            seq_len=13,
            batch_size=3,
            rank=rank,
            world=world,
        )

    whole = make()
    expect = [whole.next_batch()["input_ids"] for _ in range(6)]
    first = make()
    first.next_batch(), first.next_batch()
    second = make()
    assert second.resume([json.loads(json.dumps(first.state_dict()))]) is None  # plain data; same layout: exact
    for want in expect[2:]:
        assert torch.equal(second.next_batch()["input_ids"], want)
    # rank sharding: document i belongs to rank i % 2
    r1 = make(rank=1, world=2)
    text = "".join(chr(t) for t in r1.next_batch()["input_ids"].flatten().tolist() if t)
    assert text.startswith(docs[1])


@pytest.mark.parametrize("new_world", [1, 3])
def test_task_stream_resharded_resume_continues_with_the_next_examples(new_world: int) -> None:
    task = MQAR(seq_len=24, vocab=32, num_pairs=2, num_queries=2)
    old = [TaskStream(task, seed=5, batch_size=2, rank=k, world=2) for k in range(2)]
    for stream in old:
        for _ in range(3):
            stream.next_batch()  # 2 ranks x 3 batches x 2 rows: examples 0..11 used
    states = json.loads(json.dumps([s.state_dict() for s in old]))
    for rank in range(new_world):
        stream = TaskStream(task, seed=5, batch_size=2, rank=rank, world=new_world)
        assert stream.resume(states) is None  # exact: nothing to report
        for batch in range(2):
            got = stream.next_batch()["input_ids"]
            first = 12 + (batch * new_world + rank) * 2
            want = torch.stack([task.example(5, first + r).input_ids for r in range(2)])
            assert torch.equal(got, want), (rank, batch)


@pytest.mark.parametrize("new_world", [1, 3])
def test_packed_text_resharded_resume_loses_no_document(new_world: int) -> None:
    docs = [f"<{i}:" + "x" * (3 + 5 * (i % 4)) + ">" for i in range(24)]

    def make(rank: int, world: int) -> PackedText:
        return PackedText(
            lambda: iter(docs), lambda t: [ord(c) for c in t], seq_len=7, batch_size=2, rank=rank, world=world
        )

    def text(batches: list[torch.Tensor]) -> str:
        return "".join(chr(t) for b in batches for t in b.flatten().tolist())

    old = [make(k, 2) for k in range(2)]
    old_text = [text([s.next_batch()["input_ids"] for _ in range(3)]) for s in old]
    states = json.loads(json.dumps([s.state_dict() for s in old]))
    new = [make(k, new_world) for k in range(new_world)]
    notes = [s.resume(states) for s in new]
    assert all(note and "resharded from 2" in note for note in notes)
    new_text = []
    for s in new:
        batches = []
        try:
            for _ in range(100):
                batches.append(s.next_batch()["input_ids"])
                if s.epoch > 0:  # wrapped around: the rest of the first epoch has been read
                    break
        finally:
            new_text.append(text(batches))
    for doc in docs:  # every document is emitted whole, before or after the resharding
        assert any(doc in t for t in old_text + new_text), doc
    restart = int(notes[0].split("document ")[1].split()[0])
    assert all(any(doc in t for t in old_text) for doc in docs[:restart])  # skipped ones were used whole
    assert max(s["doc"] for s in states) - restart <= 2 * 2  # repeats: at most a few documents per old rank


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": null}', "d.jsonl:2: field 'text' is null, not a string"),
        ('{"text": 123}', "d.jsonl:2: field 'text' is 123, not a string"),
        ('{"text": ["a"]}', "d.jsonl:2: field 'text' is \\[\"a\"\\], not a string"),
        ('{"body": "a"}', "d.jsonl:2: no field 'text'"),
        ('{"text": "a"', "d.jsonl:2: not valid JSON"),
        ('"just a string"', "d.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_jsonl_records_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    stream, _, _ = build_stream(byte_opts(str(tmp_path / "d.jsonl")), seed=0)
    with pytest.raises(ValueError, match=message):
        stream.next_batch()


def test_a_parquet_column_that_is_not_text_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "e.parquet")
    stream, _, _ = build_stream(byte_opts(str(tmp_path / "e.parquet")), seed=0)
    with pytest.raises(ValueError, match="column 'text' holds int64, not strings"):
        stream.next_batch()


def test_a_tokenizer_that_cannot_be_loaded_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline, a hub name fails inside transformers with an OSError; a missing path fails its repo-id check."""
    import transformers

    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ValueError, match="data.tokenizer './no/such/dir' cannot be loaded: it is not a local dir"):
        build_stream(byte_opts(str(tmp_path / "a.txt"), tokenizer="./no/such/dir"), seed=0)

    def offline(name: str, **kwargs: object) -> None:
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ValueError, match="'gpt2' cannot be loaded.*couldn't connect.*Pass \"byte\""):
        build_stream(byte_opts(str(tmp_path / "a.txt"), tokenizer="gpt2"), seed=0)


def test_an_unreadable_file_is_reported_as_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.txt").write_text("text")
    real = Path.open

    def denied(self: Path, *args: object, **kwargs: object) -> object:  # chmod 000 does not stop root
        if self.name == "b.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ValueError, match="b.txt exists but is not readable .*give this user read access"):
        local_files(str(tmp_path))
