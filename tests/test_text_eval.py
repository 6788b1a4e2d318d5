"""benchmarks/text_eval.py: seeds aggregate to mean/min/max, and a tiny run folder evaluates end to end into a results
JSON and a plot."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import text_eval  # noqa: E402


def test_aggregate_gives_mean_and_range_over_seeds():
    def run(ppl, acc):
        return {"ppl": {"buckets": [{"start": 0, "ppl": ppl}], "overall": {"ppl": ppl}},
                "passkey": {"1024": acc}, "needle": {"1024": 0.0}, "cache_bytes": {"1024": 100}}  # fmt: skip

    summary = text_eval.aggregate({"gdn_lte-s0": run(10.0, 1.0), "gdn_lte-s1": run(20.0, 0.0), "gdn-s0": run(5, 0.5)})
    assert summary["gdn_lte"]["seeds"] == 2 and summary["gdn"]["seeds"] == 1
    assert summary["gdn_lte"]["ppl"]["0"] == {"mean": 15.0, "min": 10.0, "max": 20.0}
    assert summary["gdn_lte"]["passkey"]["1024"] == {"mean": 0.5, "min": 0.0, "max": 1.0}


def test_tiny_runs_evaluate_end_to_end(tmp_path):
    from hlsa import HybridConfig, HybridForCausalLM

    root = Path(__file__).parents[1]
    for arch in ("gdn_lte", "gdn_swa"):
        torch.manual_seed(0)
        model = HybridForCausalLM(HybridConfig.from_json_file(root / f"configs/tiny/{arch}.json"))
        model.save_pretrained(tmp_path / "runs" / f"{arch}-s0" / "export")  # no tokenizer: the byte tokenizer
    (tmp_path / "corpus").mkdir()
    text = "The pass key is hidden in this text, which goes on and on. " * 30
    (tmp_path / "corpus" / "validation.jsonl").write_text(json.dumps({"text": text}) + "\n")
    out = tmp_path / "text-test.json"
    rc = text_eval.main(["--runs", str(tmp_path / "runs"), "--corpus", str(tmp_path / "corpus"), "--where", "test",
                         "--out", str(out), "--ppl-docs", "1", "--block", "600", "--lengths", "1024,1536",
                         "--samples", "1", "--depths", "50"])  # fmt: skip
    assert rc == 0 and out.with_suffix(".png").is_file()
    result = json.loads(out.read_text())
    run = result["runs"]["gdn_lte-s0"]
    assert [(b["start"], b["end"]) for b in run["ppl"]["buckets"]] == [(0, 64), (64, 256), (256, 1024)]
    assert sum(b["tokens"] for b in run["ppl"]["buckets"]) == run["ppl"]["overall"]["tokens"]
    assert set(run["passkey"]) == set(run["needle"]) == {"1024", "1536"}
    # Both caches are constant in length; LTE's holds its buffer beside the same window.
    swa = result["runs"]["gdn_swa-s0"]["cache_bytes"]
    assert swa["1024"] == swa["1536"] and run["cache_bytes"]["1024"] == run["cache_bytes"]["1536"] > swa["1536"]
    assert result["summary"]["gdn_lte"]["seeds"] == 1 and result["trained_on"] == "test"
    # The eviction picture is drawn for the LTE model only, with what each head keeps at the end of the prompt.
    assert (tmp_path / "text-test-inspect-gdn_lte-s0.png").is_file()
    assert not (tmp_path / "text-test-inspect-gdn_swa-s0.png").exists()
    assert len(run["kept_at_end"]) == 2 and "kept_at_end" not in result["runs"]["gdn_swa-s0"]


def test_runs_of_several_folders_keep_where_each_trained(tmp_path):
    """`--runs A B`: each folder's pack summary describes its own runs only, and B's run of a name replaces A's."""

    def folder(name, runs, gpu):
        for run in runs:
            (tmp_path / name / run / "model").mkdir(parents=True)
            (tmp_path / name / run / "model" / "config.json").write_text("{}")
        summary = {"machine": {"gpu": gpu, "commit": name}, "runs": {r: {"steps": 800, "last_ce": 4.7} for r in runs}}
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        return tmp_path / name

    a = folder("a", ["gdn-s0", "gdn_lte-s0"], "GPU A")
    b = folder("b", ["gdn_lte-s0"], "GPU B")
    (tmp_path / "c" / "gdn_swa-s0" / "model").mkdir(parents=True)  # no summary: trained somewhere unrecorded
    (tmp_path / "c" / "gdn_swa-s0" / "model" / "config.json").write_text("{}")
    runs, trained = text_eval.collect_runs([a, b, tmp_path / "c"])
    assert runs == {"gdn-s0": a / "gdn-s0" / "model", "gdn_lte-s0": b / "gdn_lte-s0" / "model",
                    "gdn_swa-s0": tmp_path / "c" / "gdn_swa-s0" / "model"}  # fmt: skip
    assert trained["gdn-s0"]["device"] == "GPU A" and trained["gdn_lte-s0"]["device"] == "GPU B"
    assert trained["gdn_lte-s0"]["commit"] == "b" and trained["gdn_lte-s0"]["steps"] == 800
    assert "gdn_swa-s0" not in trained
    # A later folder without a summary drops the earlier record of the run it replaces.
    (tmp_path / "d" / "gdn-s0" / "model").mkdir(parents=True)
    (tmp_path / "d" / "gdn-s0" / "model" / "config.json").write_text("{}")
    assert "gdn-s0" not in text_eval.collect_runs([a, tmp_path / "d"])[1]
