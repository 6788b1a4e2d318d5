"""lm-evaluation-harness on a tiny saved hlsa model with local NIAH task files: Python API and the CLI entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'lm-eval[hf]>=0.4.8,<0.5'")

LENGTHS = (460, 540)


def _write_tasks(out: Path, *, tasks: list[str], lengths: tuple[int, ...], depths: list[float]) -> list[str]:
    from hlsa.eval.lm_eval_tasks import write_lm_eval_tasks
    from hlsa.eval.niah import make_samples
    from hlsa.tokenizer import byte_tokenizer

    samples = make_samples(tasks, tokenizer=byte_tokenizer(), lengths=lengths, depths=depths, tokens_to_generate=6)
    return write_lm_eval_tasks(out, samples, max_gen_toks=6)


def _metric_keys(lengths: tuple[int, ...]) -> set[str]:
    return {f"{n},none" for n in lengths} | {"all,none"}


def test_python_api_and_batching(tiny_lte_dir: Path, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hlsa.eval.harness import HlsaLM

    names = _write_tasks(tmp_path / "tasks", tasks=["niah_single_1"], lengths=LENGTHS, depths=[20.0, 80.0])
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    responses = {}
    for batch_size in (1, 4):
        lm = HlsaLM(pretrained=str(tiny_lte_dir), kernels="torch", dtype="float32", device="cpu", batch_size=batch_size)
        assert lm.model.config.backend == "torch"
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=True)
        for name in names:
            assert _metric_keys(LENGTHS) <= set(out["results"][name])
            assert all(0.0 <= out["results"][name][k] <= 1.0 for k in _metric_keys(LENGTHS))
        responses[batch_size] = {
            (name, s["doc_id"]): s["resps"] for name in names for s in out["samples"][name]
        }  # fmt: skip
    assert len(responses[1]) == 4
    # Left-padded batches of 4 (prompts of different lengths) must generate exactly what single prompts do.
    assert responses[4] == responses[1]


def test_cli_entry_point(tiny_lte_dir: Path, tmp_path: Path) -> None:
    """The stock `hf` model type loads an LTE checkpoint; two prompts of different lengths share a padded batch."""
    names = _write_tasks(tmp_path / "tasks", tasks=["niah_multikey_2"], lengths=(450,), depths=[0.0, 100.0])
    out = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "hlsa.eval.harness", "--model", "hf",
        "--model_args", f"pretrained={tiny_lte_dir},dtype=float32,add_bos_token=True",
        "--include_path", str(tmp_path / "tasks"), "--tasks", names[0], "--batch_size", "2", "--device", "cpu",
        "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, done.stderr[-2000:]
    results = json.loads(files[0].read_text())["results"][names[0]]
    assert _metric_keys((450,)) <= set(results)


def test_kernels_argument_is_checked(tiny_lte_dir: Path) -> None:
    from hlsa.eval.harness import HlsaLM

    with pytest.raises(ValueError, match="kernels"):
        HlsaLM(pretrained=str(tiny_lte_dir), kernels="cuda-graphs", device="cpu")
