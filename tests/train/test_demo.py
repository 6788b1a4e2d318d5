"""The demo's evaluation path on an untrained tiny checkpoint (the shipped checkpoints are evaluated by `make demo`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hlsa import demo


def test_demo_evaluates_and_writes_its_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hlsa.config import HybridConfig
    from hlsa.model import HybridForCausalLM

    HybridForCausalLM(HybridConfig(**demo.arch_configs()["gdn_lte"])).save_pretrained(tmp_path / "ckpt" / "gdn_lte")
    out = tmp_path / "out"
    assert demo.main(checkpoints=str(tmp_path / "ckpt"), out=str(out), examples=3, threads=1) == 0
    table = capsys.readouterr().out
    assert "| gdn_lte |" in table and "skipping gdn_swa" in table
    results = json.loads((out / "results.json").read_text())["gdn_lte"]
    recipe = demo.load_recipe(demo.DEFAULT_RECIPE)["data"]
    assert sum(results["queries"].values()) == 3 * recipe["num_queries"]  # every query is counted once
    assert results["cache_bytes"] == results["cache_bytes_4x"]  # SWA ring + LTE buffer: constant memory
    assert (out / "recall.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown"):
        demo.main(checkpoints=str(tmp_path / "ckpt"), out=str(out), archs=["mamba"])


def test_demo_writes_under_runs_and_checks_its_output_first(tmp_path: Path, monkeypatch, capsys) -> None:
    from hlsa.cli import build_parser, main

    args = build_parser().parse_args(["demo"])
    assert args.out == "runs/demo" and args.func is demo.run  # registered by hlsa.demo, not into docs/
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(demo, "load_recipe", lambda path: pytest.fail("the demo started before checking --out"))
    assert main(["demo", "--out", str(tmp_path / "file" / "out")]) == 2
    assert "cannot create its directory" in capsys.readouterr().err


def test_demo_training_resumes_from_its_run_directory(tmp_path: Path) -> None:
    recipe = demo.load_recipe(demo.DEFAULT_RECIPE)
    recipe["data"].update(seq_len=48, batch_size=2, num_pairs=6, num_queries=4)
    recipe.setdefault("optim", {}).update(warmup_steps=1)
    recipe["train"].update(steps=2, log_every=1)
    recipe["checkpoint"].update(interval=1)
    recipe["log"].update(progress=False)
    out, run = tmp_path / "ckpt" / "gdn_swa", tmp_path / "runs" / "gdn_swa"
    demo.train_arch("gdn_swa", recipe, out, run, threads=1)
    first = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert first == [1, 2] and (out / "model.safetensors").is_file()
    assert len(AutoTokenizer.from_pretrained(out, local_files_only=True)) == 256  # the task's tokenizer, for the CLI
    recipe["train"].update(steps=3)  # a longer run continues from step 2 instead of starting over
    demo.train_arch("gdn_swa", recipe, out, run, threads=1)
    second = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert second == [1, 2, 3]


def test_recipe_demo_table_shapes_the_models() -> None:
    configs = demo.arch_configs(
        {
            "layers": 2,
            "window": 8,
            "lte_buffer": 5,
            "router_bias_init": -1.0,
            "lte_warmup_steps": 7,
            "lte_lambda_max": 0.5,
            "lte_train_selection": "buffer",
        }
    )
    assert configs["gdn_lte"]["mixers"] == ["gdn", "lte"] and configs["transformer"]["mixers"] == ["attn", "attn"]
    assert configs["gdn_lte"]["lte"]["buffer_size"] == 5 and configs["gdn_lte"]["lte"]["router_bias_init"] == -1.0
    assert configs["gdn_lte"]["lte"]["l1_warmup_steps"] == 7 and configs["gdn_lte"]["lte"]["l1_lambda_max"] == 0.5
    assert configs["gdn_lte"]["lte"]["train_selection"] == "buffer"
    assert configs["gdn_swa"]["attn"]["window_size"] == 8 == configs["gdn_nsa"]["nsa"]["window_size"]
    assert demo.arch_configs({"layers": 3})["gdn_swa"]["mixers"] == ["gdn", "swa", "gdn"]
    no_l1 = demo.arch_configs({"lte_lambda_max": 0.0})["gdn_lte"]["lte"]
    assert no_l1["l1_lambda_init"] == no_l1["l1_lambda_min"] == no_l1["l1_lambda_max"] == 0.0
    with pytest.raises(ValueError, match="unknown keys \\['windw'\\]"):
        demo.arch_configs({"windw": 8})
