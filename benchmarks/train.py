"""Training throughput of the 0.4B hybrids on one GPU: GDN+LTE vs GDN+SWA vs GDN+full attention.

Runs the real trainer step (`hlsa.train.trainer.Trainer.train_step`: bf16 autocast, LTE L1 + controller, clip,
AdamW) on synthetic 4096-token sequences, warms up, synchronises, then times. Prints a table headed by a machine
line and writes `train-<gpu>.json` to `--out DIR` (default benchmarks/results; shapes, dtype, versions, commit).

    PYTHONPATH=src python3 benchmarks/train.py                # all three, micro-batch 8 x 4096
    PYTHONPATH=src python3 benchmarks/train.py --archs lte --batch 4 --steps 5

GDN+LTE is timed at the operating point of the authors' recipe: the sparsity controller (docs/design.md) holds each LTE
head at about `buffer_size` = 512 kept tokens of the 4096, so `--lte-kept 512` (the default) first shifts every
router's logit bias, per head, so that 512 tokens per sequence score positive on a calibration batch, then trains
and reports the kept count it measured. At initialisation (`--lte-kept init`) the authors' +0.5 bias keeps nearly
every token: LTE is then full causal attention through the sparse kernel, which is what the first few hundred
steps of a run cost until the controller's lambda has grown.

The model configs are the authors' 0.4B ones (d=1024, 24 layers, GDN 8x128 on even layers, 16/16 heads of D=64 on odd
layers, vocab 32000, tied embeddings); the authors' SWA window 1024 is W=1023 in our convention.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import add_output_args, machine, result_path, write_result
from hlsa.ops.gated_delta import allow_fla_gated_backward_on_hopper

ATTN = {"num_heads": 16, "num_kv_heads": 16, "head_dim": 64}
LTE = {**ATTN, "window_size": 768, "buffer_size": 512, "sink_size": 4, "conv_dilation": [2, 2, 2]}
MIXER = {"lte": "lte", "swa": "swa", "attn": "attn"}


def config_dict(arch: str) -> dict:
    """The authors' 0.4B hybrid with `arch` on the odd layers."""
    cfg = {
        "vocab_size": 32000,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "gdn": {"num_heads": 8, "head_dim": 128},
        "mixers": ["gdn", MIXER[arch]] * 12,
    }
    if arch == "lte":
        cfg["lte"] = LTE
    else:
        cfg["attn"] = {**ATTN, "window_size": 1023} if arch == "swa" else ATTN
    return cfg


def router_stacks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The CNN of every LTE router in `model`; a forward hook on one sees its logits `[H, B, T]` (score > 0 <=>
    logit > 0)."""
    from hlsa.layers.lte import LTEAttention

    return [m.router.conv_stack for m in model.modules() if isinstance(m, LTEAttention)]


def router_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[torch.nn.Module, torch.Tensor]:
    """One forward pass (bf16 autocast, no grad); the logits `[H, B, T]` of every LTE router CNN, as float32."""
    logits: dict[torch.nn.Module, torch.Tensor] = {}

    def record(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        logits[module] = out.detach().float()

    hooks = [s.register_forward_hook(record) for s in router_stacks(model)]
    try:
        with torch.no_grad(), torch.autocast(input_ids.device.type, dtype=torch.bfloat16):
            model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    return logits


def route_to_kept(model: torch.nn.Module, kept: int, input_ids: torch.Tensor, rounds: int = 2) -> None:
    """Shift each LTE router's logit bias per head so that about `kept` tokens per sequence score positive.

    One forward pass records every router's logits; a head's bias moves by minus the logit quantile that leaves
    `kept` of the sequence above zero. Earlier layers' new selections change later layers' inputs, so it repeats.
    """
    for _ in range(rounds):
        for s, lg in router_logits(model, input_ids).items():
            groups = s.proj.bias.numel()  # one CNN per head, or one shared by all heads
            lg = lg.reshape(groups, -1)
            k = max(1, lg.shape[1] - kept * input_ids.shape[0])  # the k-th smallest is the threshold
            s.proj.bias.data -= lg.kthvalue(k, dim=1).values.to(s.proj.bias.dtype)


def kept_per_head(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Mean tokens per sequence and LTE head with a positive score (what the controller counts)."""
    logits = router_logits(model, input_ids).values()  # logit > 0 <=> score > 0
    counts = [(lg > 0).float().sum(-1).mean() for lg in logits]
    return float(torch.stack(counts).mean())


def kept_arg(value: str) -> int | None:
    """`--lte-kept`: a positive token count, or `init` (None: the routers as built)."""
    if value == "init":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens or 'init', got {value!r}")
    return int(value)


def synthetic_trainer(
    config_path: Path,
    *,
    batch: int,
    seq_len: int,
    steps: int,
    workdir: Path,
    device: str = "auto",
    dtype: str = "bf16",
    lte_kept: int | None = None,
) -> tuple[Any, torch.Tensor]:
    """A `Trainer` of the model at `config_path` on synthetic MQAR rows, without checkpoints or logs, and a probe batch
    of its data. With `lte_kept`, its LTE routers are first moved to that operating point (`route_to_kept`).
    Shared with `kernel_profile.py`, which profiles the same step."""
    from hlsa.config import HybridConfig
    from hlsa.train.options import build_options
    from hlsa.train.trainer import Trainer

    vocab = HybridConfig.from_json_file(str(config_path)).vocab_size
    opts = build_options(
        overrides={
            "model.config": str(config_path),
            "data.source": "synthetic:mqar",
            "data.task_vocab": vocab,
            "data.num_pairs": min(64, vocab // 4, seq_len // 8),
            "data.num_queries": min(64, seq_len // 8),
            "data.seq_len": seq_len,
            "data.batch_size": batch,
            "train.steps": steps,
            "train.device": device,
            "train.dtype": dtype,
            "train.fla_hopper_bypass": True,
            "checkpoint.dir": str(workdir / config_path.stem),
            "checkpoint.interval": 0,
            "log.progress": False,
            "log.tensorboard": False,
        }
    )
    trainer = Trainer(opts)
    probe = trainer.data.next_batch()["input_ids"].to(trainer.device)
    if lte_kept is not None and "lte" in trainer.model.config.mixers:
        route_to_kept(trainer.model, lte_kept, probe)
    return trainer, probe


def bench(
    arch: str, *, batch: int, seq_len: int, steps: int, warmup: int, workdir: Path, lte_kept: int | None = None
) -> dict:
    from hlsa.config import HybridConfig

    path = workdir / f"{arch}.json"
    HybridConfig(**config_dict(arch)).to_json_file(str(path))
    trainer, probe = synthetic_trainer(
        path, batch=batch, seq_len=seq_len, steps=warmup + steps, workdir=workdir, lte_kept=lte_kept
    )
    params = sum(p.numel() for p in trainer.model.parameters())
    for s in range(1, warmup + 1):
        trainer.train_step(s)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for s in range(warmup + 1, warmup + steps + 1):
        m = trainer.train_step(s)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    extra = {}
    if arch == "lte":
        extra = {"lte_kept_target": lte_kept or "init", "lte_kept_measured": kept_per_head(trainer.model, probe)}
    return {
        "arch": f"gdn_{arch}_0.4B",
        **extra,
        "params": params,
        "batch": batch,
        "seq_len": seq_len,
        "step_ms": 1e3 * dt,
        "tokens_per_s": batch * seq_len / dt,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "last_loss": m["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="lte,swa,attn", help="comma-separated subset of lte,swa,attn")
    p.add_argument("--batch", type=int, default=8, help="micro-batch (halved on out-of-memory)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--lte-kept",
        type=kept_arg,
        default=512,
        help="tokens per sequence each LTE head keeps while timed (the controller's target), or 'init' (as built)",
    )
    add_output_args(p)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train.py needs a CUDA GPU")
    info = {
        **machine(args.commit),
        "dtype": "bf16 autocast, fp32 weights, AdamW",
        "fla_guard_bypassed": allow_fla_gated_backward_on_hopper(),
    }
    print(f"# {info}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            batch = args.batch
            while batch >= 1:
                try:
                    rows.append(
                        bench(
                            arch,
                            batch=batch,
                            seq_len=args.seq_len,
                            steps=args.steps,
                            warmup=args.warmup,
                            workdir=Path(tmp),
                            lte_kept=args.lte_kept,
                        )
                    )
                    break
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    batch //= 2
            else:
                rows.append({"arch": f"gdn_{arch}_0.4B", "error": "out of memory at batch 1"})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'arch':<18}{'params':>10}{'batch':>7}{'step ms':>10}{'tok/s':>12}{'peak GiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:<18}  {r['error']}")
            continue
        print(
            f"{r['arch']:<18}{r['params'] / 1e6:>9.1f}M{r['batch']:>7}{r['step_ms']:>10.1f}"
            f"{r['tokens_per_s']:>12.0f}{r['peak_mem_gib']:>10.1f}"
        )
    print(f"wrote {write_result(result_path('train', args.out), {'machine': info, 'results': rows})}")


if __name__ == "__main__":
    main()
