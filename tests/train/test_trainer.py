"""The training loop end to end on the tiny GDN+LTE config (CPU): loss falls, resume is bitwise, non-finite steps
are skipped, SIGTERM saves, exports load with `from_pretrained`."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from hlsa.errors import UsageError
from hlsa.train.options import Options, build_options
from hlsa.train.trainer import Trainer, TrainingDivergedError, TrainingInterruptedError, lr_factor

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path: Path, **lte: object) -> str:
    """configs/tiny/gdn_lte.json with router dropout on (so RNG state matters) and a fast controller."""
    cfg = json.loads((REPO / "configs" / "tiny" / "gdn_lte.json").read_text())
    cfg["lte"].update({"dropout_prob": 0.1, "l1_lambda_update_steps": 2, "l1_lambda_init": 1e-3, **lte})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def options(config: str, run: Path, **over: object) -> Options:
    base = {
        "model.config": config,
        "data.source": "synthetic:mqar",
        "data.seq_len": 48,
        "data.batch_size": 2,
        "data.num_pairs": 4,
        "data.num_queries": 4,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 2,
        "optim.grad_accum": 2,
        "train.steps": 6,
        "train.device": "cpu",
        "train.seed": 5,
        "train.threads": 1,
        "checkpoint.dir": str(run),
        "checkpoint.interval": 3,
        "log.progress": False,
        "log.tensorboard": False,
    }
    return build_options(overrides={**base, **over})


def test_lr_schedule() -> None:
    f = [lr_factor(s, warmup=4, total=14, min_ratio=0.1) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert f[14] == pytest.approx(0.1) and f[15] == pytest.approx(0.1) and f[9] == pytest.approx(0.55)


def test_loss_falls_on_text(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    opts = options(
        tiny_config(tmp_path),
        tmp_path / "run",
        **{"data.source": str(tmp_path / "a.txt"), "data.tokenizer": "byte", "train.steps": 25, "optim.lr": 3e-3},
    )
    losses = [m["loss"] for m in Trainer(opts).run()]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5, losses


def test_resume_is_bitwise(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    torch.manual_seed(123)  # the outer RNG state must not matter
    unbroken = Trainer(options(config, tmp_path / "a"))
    full = unbroken.run()

    class KilledError(Exception):
        pass

    first = Trainer(options(config, tmp_path / "b"))
    step = first.train_step

    def dies_at_5(n: int) -> dict[str, float]:
        if n == 5:
            raise KilledError  # a crash: step 4 was done but not saved; the checkpoint at step 3 survives
        return step(n)

    first.train_step = dies_at_5
    with pytest.raises(KilledError):
        first.run()
    torch.manual_seed(456)
    resumed = Trainer(options(config, tmp_path / "b", **{"checkpoint.resume": True}))
    assert resumed.step == 3
    rest = resumed.run()
    assert [m["loss"] for m in rest] == [m["loss"] for m in full[3:]]  # bitwise, not approximately
    for (name, a), b in zip(unbroken.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert float(resumed.model.model.l1_lambda.abs().sum()) > 0  # the controller ran across the resume


def test_non_finite_steps_are_skipped(tmp_path: Path) -> None:
    trainer = Trainer(options(tiny_config(tmp_path), tmp_path / "run", **{"train.steps": 4}))
    calls = {"n": 0, "updates": 0}

    def poison(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] in (3, 4) else output  # both micro-batches of step 2

    trainer.model.lm_head.register_forward_hook(poison)
    trainer.optimizer.register_step_post_hook(lambda *a: calls.__setitem__("updates", calls["updates"] + 1))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hist = trainer.run()
    assert [m["finite"] for m in hist] == [1.0, 0.0, 1.0, 1.0] and trainer.skipped == 1
    assert calls["updates"] == 3 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())

    strict = Trainer(options(tiny_config(tmp_path), tmp_path / "run2", **{"train.skip_nan_inf": False}))
    strict.model.lm_head.register_forward_hook(lambda m, a, o: o * float("nan"))
    with pytest.raises(FloatingPointError, match="skip_nan_inf"):
        strict.run()


def test_sigterm_saves_then_resume_finishes(tmp_path: Path) -> None:
    """A stop request saves the step and raises instead of exporting: an interrupted run is not a trained model."""
    config, export = tiny_config(tmp_path), tmp_path / "hf"
    trainer = Trainer(
        options(config, tmp_path / "run", **{"checkpoint.interval": 100, "checkpoint.export": str(export)})
    )
    step = trainer.train_step

    def signal_at_2(n: int) -> dict[str, float]:
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled after the step completes
        return step(n)

    trainer.train_step = signal_at_2
    with pytest.raises(TrainingInterruptedError, match="stopped at step 2 of 6"):
        trainer.run()
    assert trainer.step == 2 and (tmp_path / "run" / "latest").read_text() == "step-00000002"
    assert not export.exists()
    resumed = Trainer(
        options(config, tmp_path / "run", **{"checkpoint.resume": True, "checkpoint.export": str(export)})
    )
    assert len(resumed.run()) == 4 and resumed.step == 6
    assert (export / "model.safetensors").is_file()


def test_a_fresh_run_refuses_a_directory_with_checkpoints(tmp_path: Path) -> None:
    """Without --resume, starting over in an old run's directory would interleave the two runs' steps and prune the
    new run's checkpoints as the oldest."""
    config = tiny_config(tmp_path)
    Trainer(options(config, tmp_path / "run")).run()
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        Trainer(options(config, tmp_path / "run", **{"train.steps": 2, "optim.warmup_steps": 1}))


def test_resume_checks_the_model_and_data_and_says_when_there_is_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path)
    Trainer(options(config, tmp_path / "run", **{"train.steps": 3})).run()
    other = json.loads(Path(config).read_text())
    other["hidden_size"] = 48
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="holds another model than model.config"):
        Trainer(options(str(tmp_path / "other.json"), tmp_path / "run", **{"checkpoint.resume": True}))
    with pytest.raises(ValueError, match="data.source='synthetic:mqar' \\(now 'synthetic:passkey'\\)"):
        Trainer(options(config, tmp_path / "run", **{"checkpoint.resume": True, "data.source": "synthetic:passkey"}))
    fresh = Trainer(options(config, tmp_path / "typo", **{"checkpoint.resume": True}))
    assert fresh.step == 0 and "no checkpoint in" in capsys.readouterr().err


def test_resume_takes_this_runs_optimizer_options(tmp_path: Path) -> None:
    """--optim.lr (and AdamW's other hyperparameters) of the resumed run apply; the loaded state dicts do not win."""
    config = tiny_config(tmp_path)
    Trainer(options(config, tmp_path / "run", **{"train.steps": 3})).run()
    new = {"checkpoint.resume": True, "optim.lr": 1e-4, "optim.min_lr_ratio": 1.0, "optim.weight_decay": 0.0}
    resumed = Trainer(options(config, tmp_path / "run", **new))
    group = resumed.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.0 and group["lr"] == pytest.approx(1e-4)
    assert [m["lr"] for m in resumed.run()] == pytest.approx([1e-4] * 3)


def test_resumed_log_has_each_step_once(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    first = Trainer(options(config, tmp_path / "run"))
    step = first.train_step

    def dies_at_5(n: int) -> dict[str, float]:
        if n == 5:
            raise RuntimeError("crash")  # steps 4 was logged, the checkpoint is step 3
        return step(n)

    first.train_step = dies_at_5
    with pytest.raises(RuntimeError, match="crash"):
        first.run()
    Trainer(options(config, tmp_path / "run", **{"checkpoint.resume": True})).run()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_export_loads_with_from_pretrained(tmp_path: Path) -> None:
    from hlsa.model import HybridForCausalLM

    export = tmp_path / "hf"
    trainer = Trainer(options(tiny_config(tmp_path), tmp_path / "run", **{"checkpoint.export": str(export)}))
    trainer.run()
    ids = torch.randint(0, 256, (2, 40))
    trainer.model.eval()
    want = trainer.model(input_ids=ids).logits
    for path in (export, tmp_path / "run" / "step-00000006"):
        loaded = HybridForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(loaded.model.l1_lambda, trainer.model.model.l1_lambda)


def test_hlsa_train_command_line(tmp_path: Path) -> None:
    """`hlsa train` flags reach the trainer (the parser is the one `hlsa.cli` registers)."""
    import argparse

    from hlsa.train.cli import register

    parser = argparse.ArgumentParser(prog="hlsa")
    register(parser.add_subparsers())
    opts_file = tmp_path / "o.yaml"
    opts_file.write_text("data:\n  seq_len: 40\n  batch_size: 1\n  num_pairs: 2\n  num_queries: 2\n")
    argv = ["train", "--options", str(opts_file), "--config", tiny_config(tmp_path), "--data", "synthetic:passkey"]
    argv += [
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "2",
        "--optim.warmup_steps",
        "1",
        "--train.threads",
        "1",
        "--log.tensorboard",
        "false",
    ]
    argv += ["--checkpoint.export", str(tmp_path / "hf")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert (tmp_path / "run" / "latest").read_text() == "step-00000002" and (tmp_path / "hf" / "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "lte/num_kept" in rows[0]


def test_warmup_runs_full_attention_then_routes(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, l1_warmup_steps=2, routing_freeze_steps=3)
    trainer = Trainer(options(config, tmp_path / "run", **{"train.steps": 3}))
    router = next(p for n, p in trainer.model.named_parameters() if ".router." in n)
    start = router.detach().clone()
    hist = trainer.run()
    assert [m["lte/num_kept"] for m in hist[:2]] == [48.0, 48.0]  # warm-up: num_kept := seq_len, no EMA
    assert hist[2]["lte/num_kept"] < 48.0
    assert all(layer.attn.routing_enabled for layer in trainer.model.model.layers if hasattr(layer.attn, "router"))
    assert torch.equal(router, start)  # frozen for 3 steps (no weight decay either)
    trainer.opts.train.steps = 4
    trainer.run()
    assert not torch.equal(router, start)


def test_text_runs_save_their_tokenizer(tmp_path: Path) -> None:
    """Step directories and the export carry the training tokenizer (text: the one that puts <bos> first as
    training did; synthetic tasks: the task's symbols), so `hlsa generate` / `hlsa eval` do not fall back to
    another one."""
    from hlsa.loading import load_tokenizer

    (tmp_path / "a.txt").write_text("some text to pack. " * 20)
    export = tmp_path / "hf"
    over = {
        "data.source": str(tmp_path / "a.txt"),
        "train.steps": 2,
        "optim.warmup_steps": 1,
        "checkpoint.export": str(export),
    }
    Trainer(options(tiny_config(tmp_path), tmp_path / "run", **over)).run()
    for path in (export, tmp_path / "run" / "step-00000002"):
        tok = load_tokenizer(path, None)
        assert (path / "tokenizer.json").is_file() and tok("hi")["input_ids"] == [257, ord("h"), ord("i")]
    synthetic = Trainer(
        options(tiny_config(tmp_path), tmp_path / "mqar", **{"train.steps": 1, "optim.warmup_steps": 0})
    )
    synthetic.run()
    # A synthetic task's checkpoint carries a tokenizer of the task's own symbols (keys k0.., values v0..).
    tok = load_tokenizer(tmp_path / "mqar" / "step-00000001", None)
    assert tok.decode(tok("k3 v7")["input_ids"]) == "k3 v7" and len(tok) <= synthetic.model.config.vocab_size


def test_a_killed_run_loses_no_log_row(tmp_path: Path) -> None:
    """SIGKILL gives Python no chance to flush: the log must already hold every step of the checkpoint, and the
    resumed run continues it without a gap or a duplicate."""
    import subprocess
    import sys

    config, run = tiny_config(tmp_path), tmp_path / "run"
    child = f"""
import os, signal, sys
sys.path[:0] = {sys.path!r}
from tests.train.test_trainer import options
from hlsa.train.trainer import Trainer
trainer = Trainer(options({config!r}, __import__("pathlib").Path({str(run)!r})))
step = trainer.train_step
def killed_at_5(n):
    if n == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # steps 1-4 logged (log_every 10: never flushed), checkpoint at 3
    return step(n)
trainer.train_step = killed_at_5
trainer.run()
"""
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (run / "latest").read_text() == "step-00000003"
    Trainer(options(config, run, **{"checkpoint.resume": True})).run()
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_torn_log_line_is_dropped_on_resume(tmp_path: Path) -> None:
    config, run = tiny_config(tmp_path), tmp_path / "run"
    Trainer(options(config, run, **{"train.steps": 3})).run()
    with (run / "log.jsonl").open("a") as fh:
        fh.write('{"step": 4, "loss": 1.2')  # a kill in the middle of a write
    Trainer(options(config, run, **{"checkpoint.resume": True, "train.steps": 4})).run()
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_diverged_run_stops_without_saving_or_exporting(tmp_path: Path) -> None:
    export = tmp_path / "hf"
    over = {"train.max_consecutive_skips": 3, "checkpoint.export": str(export), "checkpoint.interval": 3}
    trainer = Trainer(options(tiny_config(tmp_path), tmp_path / "run", **over))
    trainer.model.lm_head.register_forward_hook(lambda m, a, o: o * float("nan"))
    with pytest.raises(TrainingDivergedError, match="the last 3 steps \\(to step 3\\) all had a non-finite loss"):
        trainer.run()
    assert trainer.step == 3 and not export.exists() and not (tmp_path / "run" / "latest").exists()

    unlimited = Trainer(options(tiny_config(tmp_path), tmp_path / "run2", **{"train.max_consecutive_skips": 0}))
    unlimited.model.lm_head.register_forward_hook(lambda m, a, o: o * float("nan"))
    assert [m["finite"] for m in unlimited.run()] == [0.0] * 6


def test_a_second_sigterm_abandons_the_running_step(tmp_path: Path) -> None:
    """For a step too long to wait for: the first signal asks for a save after the step, the second stops now and
    keeps the last checkpoint."""
    trainer = Trainer(options(tiny_config(tmp_path), tmp_path / "run"))
    step = trainer.train_step

    def two_signals_in_step_5(n: int) -> dict[str, float]:
        if n == 5:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(n)

    trainer.train_step = two_signals_in_step_5
    with pytest.raises(TrainingInterruptedError, match="abandoning step 5 of 6; the last checkpoint .*step-00000003"):
        trainer.run()
    assert trainer.step == 4 and (tmp_path / "run" / "latest").read_text() == "step-00000003"
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(("step", "."))) == ["step-00000003"]


@pytest.mark.parametrize(
    ("key", "where", "message"),
    [
        ("checkpoint.dir", "file", "checkpoint.dir .* is a file, not a directory"),
        ("checkpoint.dir", "under_file", "checkpoint.dir .* cannot be created: .* is a file"),
        ("checkpoint.export", "file", "checkpoint.export .* is a file, not a directory"),
        ("checkpoint.export", "under_file", "checkpoint.export .* cannot be created: .* is a file"),
    ],
)
def test_bad_output_paths_fail_before_any_work(tmp_path: Path, key: str, where: str, message: str) -> None:
    (tmp_path / "f").write_text("x")
    path = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    opts = options(tiny_config(tmp_path), tmp_path / "run", **{key: str(path)})
    with pytest.raises(UsageError, match=message):
        Trainer(opts)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_an_unwritable_output_path_fails_before_any_work(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(UsageError, match="checkpoint.export .* is not writable"):
        Trainer(options(tiny_config(tmp_path), tmp_path / "run", **{"checkpoint.export": str(locked / "hf")}))


def test_a_step_that_cannot_fit_is_refused_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hlsa.train import trainer as trainer_module

    config = tiny_config(tmp_path)
    with pytest.raises(UsageError, match="needs at least .* GiB \\(data.batch_size 100000000 x data.seq_len 48"):
        Trainer(options(config, tmp_path / "run", **{"data.batch_size": 100_000_000}))
    opts = options(config, tmp_path / "run")
    monkeypatch.setattr(trainer_module, "available_memory", lambda device: 2**20)  # 1 MiB left
    with pytest.raises(UsageError, match="only 0.0 GiB are free on cpu; lower data.batch_size"):
        Trainer(opts)
    assert not (tmp_path / "run").exists()


def test_lower_bound_counts_optimizer_state_and_activations(tmp_path: Path) -> None:
    from hlsa.train.trainer import step_memory_lower_bound

    trainer = Trainer(options(tiny_config(tmp_path), tmp_path / "run"))
    params = sum(p.numel() for p in trainer.model.parameters())
    c = trainer.model.config
    want = 12 * params + 2 * 48 * (c.num_hidden_layers * c.hidden_size + 2 * c.vocab_size) * 4
    assert step_memory_lower_bound(trainer.model, trainer.opts, torch.device("cpu"), 1) == want


def test_cli_reports_bad_model_configs_and_stale_temporaries_are_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hlsa.cli import main

    (tmp_path / "bad.json").write_text('{"hidden_size": 64,')
    run = tmp_path / "run"
    (run / ".tmp-step-00000009-1").mkdir(parents=True)  # a save killed mid-write
    argv = ["train", "--config", str(tmp_path / "bad.json"), "--data", "synthetic:mqar", "--out", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlsa: error: model.config: cannot read a HybridConfig from") and "bad.json" in err
    assert "Traceback" not in err
    Trainer(options(tiny_config(tmp_path), run, **{"train.steps": 1, "optim.warmup_steps": 0}))
    assert not (run / ".tmp-step-00000009-1").exists()


def test_a_full_disk_stops_the_log_not_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from hlsa.train.monitor import Monitor

    opts = options(tiny_config(tmp_path), tmp_path / "run", **{"train.log_every": 1})
    monitor = Monitor(opts, rank=0, start_step=0, total_steps=2, run_dir=tmp_path / "run")

    class Full:
        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    monitor.jsonl.close()
    monitor.jsonl = Full()
    monitor.step(1, {"loss": 1.0, "lr": 1e-3}, tokens=10)
    monitor.step(2, {"loss": 1.0, "lr": 1e-3}, tokens=10)
    monitor.sync()
    monitor.close()
    assert capsys.readouterr().out.count("log.jsonl: cannot write (No space left on device)") == 1


def test_a_full_disk_during_training_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    from hlsa.cli import main

    real, saves = torch.save, {"n": 0}

    def full_on_the_second_checkpoint(obj: object, f: object, *args: object, **kwargs: object) -> None:
        saves["n"] += 1
        if saves["n"] > 2:  # optimizer.pt + trainer.pt of step 3 fit; step 6 finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_the_second_checkpoint)
    run = tmp_path / "run"
    argv = ["train", "--config", tiny_config(tmp_path), "--data", "synthetic:mqar", "--out", str(run), "--steps", "6"]
    argv += ["--data.seq_len", "48", "--data.batch_size", "2", "--data.num_pairs", "4", "--data.num_queries", "4"]
    argv += ["--optim.warmup_steps", "2", "--train.threads", "1", "--checkpoint.interval", "3"]
    argv += ["--log.progress", "false", "--log.tensorboard", "false", "--checkpoint.export", str(tmp_path / "hf")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "hlsa: error: cannot write checkpoint step-00000006" in err and "the disk is full" in err
    assert sorted(p.name for p in run.iterdir()) == ["latest", "log.jsonl", "step-00000003"]
    assert (run / "latest").read_text() == "step-00000003" and not (tmp_path / "hf").exists()


def test_the_signed_controller_brings_a_collapsed_router_back(tmp_path: Path) -> None:
    """Every router starts with all scores negative (a collapsed head: sliding-window attention). The authors'
    controller leaves it there, since only positive scores are penalised; the signed one pulls it back to its
    target (buffer_size = 6 kept tokens per row)."""
    kept = {}
    for signed in (True, False):
        config = tiny_config(
            tmp_path,
            router_bias_init=-2.0,
            l1_lambda_signed=signed,
            l1_lambda_update_steps=1,
            l1_lambda_init=1e-2,
            l1_lambda_min=1e-2,
        )
        opts = options(config, tmp_path / f"run-{signed}", **{"train.steps": 40, "optim.grad_accum": 1})
        rows = Trainer(opts).run()
        assert rows[0]["lte/num_kept"] < 0.5
        kept[signed] = sum(r["lte/num_kept"] for r in rows[-20:]) / 20
    assert kept[True] > 3 and kept[False] < 1, kept


@pytest.mark.parametrize("bias", [0.5, -2.0])
def test_the_threshold_controller_holds_the_target_from_either_side(tmp_path: Path, bias: float) -> None:
    """With the L1 term off, `threshold_step` with the centred router gradient brings the kept count to
    buffer_size = 6 (of 42 counted positions per row) from a start where every token is kept (bias +0.5) and from
    one where none is (-2.0), and holds it there."""
    config = tiny_config(
        tmp_path, router_bias_init=bias, threshold_step=0.5, router_grad_centered=True, l1_lambda_max=0.0,
        l1_lambda_min=0.0, l1_lambda_update_steps=1,
    )  # fmt: skip
    opts = options(config, tmp_path / "run", **{"train.steps": 60, "optim.grad_accum": 1})
    rows = Trainer(opts).run()
    first, last = rows[0]["lte/num_kept"], [r["lte/num_kept"] for r in rows[-20:]]
    assert (first > 30) if bias > 0 else (first < 0.5)
    assert 3 <= sum(last) / len(last) <= 10, last
