"""The training loop, in nanoGPT's order (LR, micro-steps, clip, step, controller, log, checkpoint), made safe:
non-finite steps are skipped and counted (and `train.max_consecutive_skips` in a row stop the run), checkpoints are
atomic, SIGTERM/Ctrl-C save before exiting, and `--resume` continues bit for bit (model, AdamW, scheduler, LTE
controller buffers, RNG states and data position).

Before the first step the output paths are checked (writable directories, not files) and one step's memory is
estimated against what the device has free (`check_step_memory`), so a bad `--out`, `--checkpoint.export` or batch
size fails at once rather than after the work.

`Trainer(opts).run()` is the whole job; `hlsa train` builds `opts` from a file and the command line.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hlsa.errors import UsageError, write_error
from hlsa.ops.gated_delta import allow_fla_gated_backward_on_hopper
from hlsa.train import checkpoint as ckpt
from hlsa.train.controller import SparsityController
from hlsa.train.data import DataExhaustedError, build_stream
from hlsa.train.distributed import (
    all_mean,
    any_rank,
    broadcast_params_equal,
    gather_objects,
    init_world,
    parallelize,
    pick_device,
)
from hlsa.train.monitor import Monitor
from hlsa.train.options import Options, OptionsError


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step + 1`: linear warm-up, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def load_config(path: str) -> Any:
    """A `HybridConfig` from a JSON file or a `save_pretrained` directory."""
    from hlsa.config import HybridConfig

    p = Path(path)
    if not p.exists():
        raise UsageError(f"model.config {path!r} does not exist; pass a HybridConfig JSON file or a model directory")
    file = p / "config.json" if p.is_dir() else p
    try:
        return HybridConfig.from_pretrained(p) if p.is_dir() else HybridConfig.from_json_file(str(p))
    except PermissionError:
        raise UsageError(f"model.config: {file} exists but is not readable (permission denied)") from None
    except (OSError, ValueError) as e:  # invalid JSON, a missing config.json, or values HybridConfig refuses
        raise UsageError(f"model.config: cannot read a HybridConfig from {file}: {e}") from None


def check_output_dir(path: str | Path, option: str) -> None:
    """Refuse `path` unless it is, or can be created as, a directory this process can write into (nothing is
    created: a probe file is opened and removed in the nearest existing ancestor)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a file, not a directory; choose a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:  # "." or "/" end it (even if cwd was removed)
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {str(path)!r} cannot be created: {existing} is a file; choose another directory")
    error = write_error(existing)
    if error is not None:
        reason = f"{existing}: {error.strerror or error}"
        raise UsageError(f"{option} {str(path)!r} is not writable ({reason}); choose a writable directory")


def available_memory(device: torch.device) -> int | None:
    """Bytes that one step may still allocate: CUDA's free memory, else the CPU's MemAvailable (lowered to the
    cgroup's limit less its usage, in a container); None where neither can be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None
    try:  # cgroup v2: "max" (no limit) fails int()
        limit = int(Path("/sys/fs/cgroup/memory.max").read_text())
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        free = min(free, limit - used) if free is not None else limit - used
    except (OSError, ValueError):
        pass
    return free


def bf16_autocast(dtype: str, device: torch.device) -> bool:
    """Whether `train.dtype` (validated: auto, bf16 or fp32) runs the forward pass under bf16 autocast."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")


def step_memory_lower_bound(model: nn.Module, opts: Options, device: torch.device, world_size: int) -> int:
    """Bytes one optimizer step must allocate at least, beyond what is already allocated.

    A deliberate under-estimate, so that a run it refuses could never have fit: per parameter its gradient and
    AdamW's two moments (and the weight itself on a GPU, where it is not yet), 4 bytes each, split over ranks under
    FSDP2; per token of a micro-batch, each layer's input hidden state kept for the backward pass and the logits
    with their gradient (`B * T * (layers * hidden + 2 * vocab)` elements, 2 bytes under bf16 autocast, else 4).
    The real footprint is several times larger (attention, MLP and mixer activations are not counted).
    """
    params = sum(p.numel() for p in model.parameters())
    state = params * 4 * (4 if device.type == "cuda" else 3)
    if opts.train.parallel == "fsdp2":
        state //= world_size
    c, d = model.config, opts.data
    elem = 2 if bf16_autocast(opts.train.dtype, device) else 4
    tokens = d.batch_size * d.seq_len
    return state + tokens * (c.num_hidden_layers * c.hidden_size + 2 * c.vocab_size) * elem


def check_step_memory(model: nn.Module, opts: Options, device: torch.device, world_size: int) -> None:
    """Refuse a step that cannot fit in `device`'s free memory (by `step_memory_lower_bound`), naming the options
    that size it: such a run would otherwise grow until the machine swaps or the kernel kills it."""
    need, free = step_memory_lower_bound(model, opts, device, world_size), available_memory(device)
    if free is not None and need > free:
        d, gib = opts.data, 2**30
        raise UsageError(
            f"one training step needs at least {need / gib:.1f} GiB (data.batch_size {d.batch_size} x data.seq_len "
            f"{d.seq_len} tokens per micro-batch, plus the optimizer state), but only {free / gib:.1f} GiB are free "
            f"on {device}; lower data.batch_size (optim.grad_accum keeps the tokens per step) or data.seq_len"
        )


class TrainingInterruptedError(Exception):
    """SIGTERM / Ctrl-C stopped the run before `train.steps`: the step was checkpointed (or, after a second signal,
    abandoned with the last checkpoint kept), nothing was exported, and the caller must not treat the model as trained
    (`hlsa train` exits 130, `hlsa demo --train` stops)."""


class TrainingDivergedError(UsageError):
    """`train.max_consecutive_skips` steps in a row had a non-finite loss or gradient: the run stopped without saving
    or exporting them. A UsageError (`hlsa train` prints one line, exit 2): the fix is an option, mostly a lower
    `optim.lr`."""


class _StopNow(BaseException):
    """Raised by a second stop signal inside whatever is running; a BaseException, like KeyboardInterrupt, so that
    no `except Exception` on the way swallows it."""


# Options a resumed run must share with its checkpoint: the data it was trained on (the model is compared by its
# parameters' names and shapes, so a config file moved or copied resumes; seq_len and batch size may change).
RESUME_MUST_MATCH = ("data.source", "data.tokenizer")


class StopRequest:
    """The first SIGTERM / Ctrl-C sets a flag that the loop checks after each step (the step is finished and saved);
    a second one interrupts at once (`_StopNow`), for a step too long to wait for: that step is abandoned and the
    last checkpoint is kept."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise _StopNow
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    """Owns the model, optimizer, scheduler, data stream and controller of one run."""

    def __init__(self, opts: Options, *, model: nn.Module | None = None) -> None:
        opts.validate()  # `build_options` did; options built in code (`Options(...)`) are checked here
        self.opts = opts
        t = opts.train
        check_output_dir(opts.checkpoint.dir, "checkpoint.dir")
        if opts.checkpoint.export:
            check_output_dir(opts.checkpoint.export, "checkpoint.export")
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.world = init_world("cpu" if t.device == "cpu" or not torch.cuda.is_available() else "cuda")
        self.device = pick_device(t.device, self.world)
        if t.fla_hopper_bypass and self.device.type == "cuda" and allow_fla_gated_backward_on_hopper():
            print("[train] fla's Hopper guard bypassed (train.fla_hopper_bypass)", file=sys.stderr)
        self.data, vocab, self.tokenizer = build_stream(
            opts.data, seed=t.seed, rank=self.world.rank, world=self.world.size
        )
        torch.manual_seed(t.seed)
        self.model = model if model is not None else self._build_model(vocab)
        check_step_memory(self.model, opts, self.device, self.world.size)
        self.model.to(self.device)
        if self.world.size > 1:
            broadcast_params_equal(self.model)
        self.net = parallelize(self.model, t.parallel, self.world, self.device)
        self.optimizer = self._build_optimizer()
        o = opts.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, warmup=o.warmup_steps, total=t.steps, min_ratio=o.min_lr_ratio),
        )
        self.controller = SparsityController.for_model(self.model, seq_len=opts.data.seq_len)
        self.step, self.skipped, self.skipped_in_a_row = 0, 0, 0
        self.history: list[dict[str, float]] = []
        self.run_dir = Path(opts.checkpoint.dir).expanduser()
        if self.world.is_main:
            ckpt.clean_stale(self.run_dir)  # what a kill during a save left; it may be what filled the disk
        torch.manual_seed(t.seed + self.world.rank)  # per-rank dropout streams, identical on every (re)start
        if opts.checkpoint.resume:
            self._resume()
        elif (self.run_dir / ckpt.LATEST).exists() or ckpt.existing_steps(self.run_dir):
            # A fresh run would interleave its steps with the old ones and prune its own as the "oldest".
            raise OptionsError(
                f"checkpoint.dir {self.run_dir} already holds checkpoints; pass --resume to continue that run, or "
                "choose another --out (or delete the directory) to start a new one"
            )

    # ------------------------------------------------------------------------------------------------ setup
    def _build_model(self, vocab: int) -> nn.Module:
        from hlsa.model import HybridForCausalLM

        path = self.opts.model.config
        if not path:
            raise UsageError("model.config is empty; pass --config PATH to a HybridConfig JSON or model directory")
        config = load_config(path)
        if config.vocab_size < vocab:
            raise UsageError(
                f"model vocab_size ({config.vocab_size}) is smaller than the data's vocabulary ({vocab}); "
                "raise vocab_size in the model config or use a smaller tokenizer / data.task_vocab"
            )
        if Path(path).is_dir():  # a saved model: start from its weights (fine-tuning), every tensor accounted for
            from hlsa.loading import load_model

            return load_model(path, dtype="float32").train()
        return HybridForCausalLM(config)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.opts.optim
        return torch.optim.AdamW(
            [p for p in self.net.parameters() if p.requires_grad],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
        )

    def _autocast(self) -> Any:
        if not bf16_autocast(self.opts.train.dtype, self.device):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------------------ loop
    def run(self) -> list[dict[str, float]]:
        """Train until `train.steps`; returns the per-step metrics of this run (also in `<dir>/log.jsonl`)."""
        t, c = self.opts.train, self.opts.checkpoint
        monitor = Monitor(
            self.opts, rank=self.world.rank, start_step=self.step, total_steps=t.steps, run_dir=self.run_dir
        )
        tokens = self.opts.data.batch_size * self.opts.data.seq_len * self.opts.optim.grad_accum * self.world.size
        saved_at = self.step

        def checkpoint() -> None:
            monitor.sync()  # the log holds every step the checkpoint does: a kill after it loses no row
            self.save()

        try:
            with StopRequest() as stop:
                while self.step < t.steps:
                    try:
                        metrics = self.train_step(self.step + 1)
                    except DataExhaustedError as e:
                        monitor.message(f"stopping at step {self.step}: {e}")
                        break
                    self.step += 1
                    self.history.append(metrics)
                    monitor.step(self.step, metrics, tokens=tokens)
                    if not metrics["finite"]:
                        monitor.message(f"step {self.step}: non-finite loss/grad norm, update skipped ({self.skipped})")
                    self._check_divergence(metrics)
                    if any_rank(stop.requested, self.world, self.device):
                        monitor.message(f"stop requested: saving step {self.step} to {self.run_dir}")
                        break
                    if c.interval > 0 and self.step % c.interval == 0:
                        checkpoint()
                        saved_at = self.step
                if self.step != saved_at:
                    checkpoint()
            if stop.requested:
                raise TrainingInterruptedError(
                    f"training stopped at step {self.step} of {t.steps}; checkpoint in {self.run_dir}, nothing "
                    "exported; rerun with --resume to continue"
                )
            if c.export:  # a finished run: every step, or the end of a non-repeating data set
                self.export(c.export)
        except _StopNow:
            latest = ckpt.latest_checkpoint(self.run_dir) if self.world.is_main else None
            kept = f"the last checkpoint ({latest}) is kept" if latest else "there is no checkpoint yet"
            raise TrainingInterruptedError(
                f"training stopped at once by a second stop signal, abandoning step {self.step + 1} of {t.steps}; "
                f"{kept}, nothing exported; rerun with --resume to continue"
            ) from None
        finally:
            monitor.close()
        return self.history

    def _check_divergence(self, metrics: dict[str, float]) -> None:
        """Stop after `train.max_consecutive_skips` skipped steps in a row, before they are saved or exported."""
        self.skipped_in_a_row = 0 if metrics["finite"] else self.skipped_in_a_row + 1
        limit = self.opts.train.max_consecutive_skips
        if 0 < limit <= self.skipped_in_a_row:
            raise TrainingDivergedError(
                f"the last {self.skipped_in_a_row} steps (to step {self.step}) all had a non-finite loss or gradient "
                f"norm and were skipped: training has diverged. Nothing was saved for them or exported; lower "
                f"optim.lr (now {self.opts.optim.lr:g}) or check the data, then rerun (--resume continues from the "
                "last checkpoint), or raise train.max_consecutive_skips (0 = never stop)"
            )

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; returns its metrics."""
        o, ctl = self.opts.optim, self.controller
        self.net.train()
        if ctl is not None:
            ctl.begin_step(step)
        total = ce = 0.0
        for micro in range(o.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.data.next_batch().items()}
            last = micro == o.grad_accum - 1
            sync = nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:
                with self._autocast():
                    out = self.net(input_ids=batch["input_ids"], labels=batch["labels"])
                loss = out.loss
                l1 = ctl.loss(out.routing, step) if ctl is not None else None
                full = loss if l1 is None else loss + l1
                (full / o.grad_accum).backward()
            if ctl is not None:
                ctl.observe(out.routing)
            ce += float(loss.detach()) / o.grad_accum
            total += float(full.detach()) / o.grad_accum
        if ctl is not None:
            ctl.drop_frozen_grads(step)
        gnorm = self._clip()
        total, ce = all_mean([total, ce], self.world, self.device)
        finite = math.isfinite(total) and math.isfinite(gnorm)
        if not finite and not self.opts.train.skip_nan_inf:
            raise FloatingPointError(f"step {step}: loss {total}, grad norm {gnorm}; set train.skip_nan_inf = true")
        lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            self.optimizer.step()
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if ctl is not None:
            ctl.end_step(step, valid=finite)
        metrics = {"loss": total, "ce": ce, "grad_norm": gnorm, "lr": lr, "finite": float(finite)}
        metrics["skipped"] = float(self.skipped)
        if ctl is not None:
            metrics.update(ctl.metrics())
        return metrics

    def _clip(self) -> float:
        clip = self.opts.optim.clip
        params = [p for p in self.net.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------------------------------------ state
    def _trainer_state(self) -> dict[str, Any]:
        mine = {"rng": ckpt.rng_state(), "data": self.data.state_dict()}
        return {
            "step": self.step,
            "skipped": self.skipped,
            "skipped_in_a_row": self.skipped_in_a_row,
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.world.size,
            "ranks": gather_objects(mine, self.world),
            "options": self.opts.to_dict(),
        }

    def save(self) -> Path | None:
        """Checkpoint the current step (collective; rank 0 writes)."""
        model_sd, optim_sd = ckpt.full_state(self.net, self.optimizer)
        state = self._trainer_state()
        if not self.world.is_main:
            return None
        c = self.opts.checkpoint
        return ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            config=self.model.config,
            model_sd=model_sd,
            optim_sd=optim_sd,
            trainer_state=state,
            keep=c.keep,
            tokenizer=self.tokenizer,
        )

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            if self.world.is_main:
                print(f"[train] --resume: no checkpoint in {self.run_dir}; starting from step 0", file=sys.stderr)
            return
        model_sd, optim_sd, state = ckpt.load_checkpoint(path)
        ours = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}  # FSDP2: DTensors, global shapes
        theirs = {k: tuple(v.shape) for k, v in model_sd.items()}
        if ours != theirs:
            diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise OptionsError(
                f"the checkpoint {path} holds another model than model.config {self.opts.model.config!r} "
                f"({len(diff)} parameters differ, e.g. {diff[:3]}); pass its config to resume it, or another --out"
            )
        saved, now = _flat(state["options"]), _flat(self.opts.to_dict())
        differ = [k for k in RESUME_MUST_MATCH if saved.get(k) != now.get(k)]
        if differ:
            was = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in differ)
            raise OptionsError(
                f"the checkpoint {path} was trained with {was}; pass the same options to resume it, or another --out"
            )
        # Model and optimizer states are unsharded, so any number of ranks can load them (FSDP2 reshards).
        ckpt.restore_state(self.net, self.optimizer, model_sd, optim_sd)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        self.skipped_in_a_row = int(state["skipped_in_a_row"])
        self._apply_optim_options()
        changed = sorted(k for k in now if k.startswith(("optim.", "train.steps")) and saved.get(k) != now[k])
        if changed and self.world.is_main:
            was = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            print(f"[train] resuming {path} with changed options: {was}", file=sys.stderr)
        note = self.data.resume([r["data"] for r in state["ranks"]])
        if state["world_size"] == self.world.size:
            ckpt.set_rng_state(state["ranks"][self.world.rank]["rng"])
        elif self.world.is_main:  # each rank keeps the fresh seed + rank streams (dropout): they cannot be split
            print(
                f"[train] resuming {path} (written by {state['world_size']} ranks) on {self.world.size}: "
                f"{note or 'the data continues exactly'}; RNG streams restart from train.seed",
                file=sys.stderr,
            )

    def _apply_optim_options(self) -> None:
        """The options of this run, not the checkpoint's, set the LR schedule and AdamW's hyperparameters: the loaded
        state dicts brought back the old peak LR, betas, eps and weight decay."""
        o, schedule = self.opts.optim, self.scheduler.lr_lambdas[0]  # this run's schedule: not saved, built anew
        self.scheduler.base_lrs = [o.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group.update(betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, initial_lr=o.lr)
            group["lr"] = o.lr * schedule(self.scheduler.last_epoch)

    def export(self, out_dir: str) -> None:
        """Write a plain HF directory of the current weights (collective; rank 0 writes)."""
        model_sd, _ = ckpt.full_state(self.net, self.optimizer)
        if not self.world.is_main:
            return
        try:
            ckpt.export_pretrained(self.model.config, model_sd, out_dir, tokenizer=self.tokenizer)
        except OSError as e:  # checked writable before the first step, so: the disk filled up
            raise ckpt.CheckpointWriteError(
                f"cannot write the export to {out_dir}: {e.strerror or e}; the trained model is in the last "
                f"checkpoint of {self.run_dir}: free space, then rerun with --resume to write the export"
            ) from e


def _flat(options: dict[str, Any]) -> dict[str, Any]:
    """`{"section.name": value}` of an `Options.to_dict()`."""
    return {f"{section}.{name}": v for section, values in options.items() for name, v in values.items()}
