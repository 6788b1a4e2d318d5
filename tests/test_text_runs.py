"""benchmarks/text_runs.py end to end on the CPU: the corpus travels as one file, a run trains through `hlsa train`
and is packed with its model and logs; a run stopped at the time limit is packed from its checkpoint."""

import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import text_runs  # noqa: E402

TINY = ["data.seq_len=64", "data.batch_size=2", "optim.warmup_steps=1", "train.log_every=1", "train.threads=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A corpus folder as `hlsa corpus` writes it (a byte-level BPE of 300 ids), packed by `pack-inputs`."""
    from hlsa.corpus import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    texts = [f"def f{i}(x):\n    return x * {i}\n\nThe value of f{i} is computed here. " * 20 for i in range(30)]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "validation.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    (root / "manifest.json").write_text("{}")
    train_tokenizer(iter(texts), 300).save_pretrained(root / "tokenizer")
    return text_runs.pack_inputs(root, root / "inputs").parent


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: m.size for m in tar.getmembers()}


def test_finished_and_stopped_runs_are_packed(inputs, tmp_path):
    out, dest = tmp_path / "runs", tmp_path / "packed"
    rc = text_runs.main(["train", "--inputs", str(inputs), "--out", str(out), "--runs", "gdn_lte:0", "--device",
                         "cpu", "--pack", str(dest), "--commit", "abc", *[a for s in TINY for a in ("--set", s)],
                         "--set", "train.steps=2"])  # fmt: skip
    assert rc == 0
    summary = json.loads((dest / "summary.json").read_text())
    run = summary["runs"]["gdn_lte-s0"]
    assert summary["machine"]["commit"] == "abc"
    assert run["exit_status"] == 0 and run["steps"] == 2 and run["model_from"] == "export" and run["weights"] == "fp32"
    members = _members(dest / "gdn_lte.tar.gz")
    assert {"gdn_lte-s0/log.jsonl", "gdn_lte-s0/train.log", "gdn_lte-s0/model/config.json",
            "gdn_lte-s0/model/tokenizer.json", "gdn_lte-s0/model/model.safetensors"} <= set(members)  # fmt: skip

    # A run that cannot finish in the time limit: SIGTERM, checkpoint, packed from the checkpoint in bf16.
    rc = text_runs.main(["train", "--inputs", str(inputs), "--out", str(out), "--runs", "gdn_swa:1", "--device",
                         "cpu", "--pack", str(dest), "--time-limit", "30", *[a for s in TINY for a in ("--set", s)],
                         "--set", "train.steps=100000", "--set", "checkpoint.interval=0"])  # fmt: skip
    assert rc == 0
    run = json.loads((dest / "summary.json").read_text())["runs"]["gdn_swa-s1"]
    assert run["exit_status"] == 130 and run["model_from"].startswith("step-") and run["weights"] == "bf16"
    assert run["steps"] >= 1
    from safetensors.torch import load_file

    with tarfile.open(dest / "gdn_swa.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    weights = load_file(tmp_path / "x/gdn_swa-s1/model/model.safetensors")
    assert "lm_head.weight" not in weights and all(str(w.dtype) == "torch.bfloat16" for w in weights.values())

    from hlsa import HybridForCausalLM

    model = HybridForCausalLM.from_pretrained(tmp_path / "x/gdn_swa-s1/model")
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()


def test_runs_are_checked():
    assert [r.name for r in text_runs.parse_runs("gdn:0,gdn_lte:2")] == ["gdn-s0", "gdn_lte-s2"]
    assert len(text_runs.parse_runs("all")) == 12
    with pytest.raises(SystemExit, match="ARCH:SEED"):
        text_runs.parse_runs("gdn_nsa:0")


def test_ship_copies_an_fp32_model_and_the_validation_excerpt(tmp_path):
    from safetensors.torch import load_file, save_file

    from hlsa import HybridConfig, HybridForCausalLM

    cfg = json.loads((Path(__file__).parents[1] / "configs/tiny/gdn_lte.json").read_text())
    cfg.pop("model_type", None)
    run = tmp_path / "runs" / "gdn_lte-s0"
    HybridForCausalLM(HybridConfig(**cfg)).save_pretrained(run / "model")
    (run / "log.jsonl").write_text('{"step": 1}\n')
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [{"id": i, "text": f"{i} " * 5000} for i in (*text_runs.EXCERPT_IDS, "other:doc")]
    (corpus / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    files = text_runs.ship(run, corpus, tmp_path / "ckpt")
    assert (tmp_path / "ckpt/gdn_lte/model.safetensors").is_file() and (tmp_path / "ckpt/gdn_lte/config.json").is_file()
    assert (tmp_path / "ckpt/gdn_lte/train_log.jsonl").read_text() == '{"step": 1}\n'
    excerpt = [json.loads(line) for line in (tmp_path / "ckpt/validation-excerpt.jsonl").read_text().splitlines()]
    assert [d["id"] for d in excerpt] == list(text_runs.EXCERPT_IDS) and files[-1].name == "validation-excerpt.jsonl"
    assert all(len(d["text"]) == text_runs.EXCERPT_CHARS and d["text"].startswith(d["id"]) for d in excerpt)

    weights = load_file(run / "model/model.safetensors")
    save_file({k: v.bfloat16() for k, v in weights.items()}, run / "model/model.safetensors")
    with pytest.raises(SystemExit, match="ship fp32 weights"):
        text_runs.ship(run, corpus, tmp_path / "ckpt2")
    (corpus / "validation.jsonl").write_text(json.dumps(docs[-1]) + "\n")
    save_file(weights, run / "model/model.safetensors")
    with pytest.raises(SystemExit, match="rebuild it"):
        text_runs.ship(run, corpus, tmp_path / "ckpt3")
