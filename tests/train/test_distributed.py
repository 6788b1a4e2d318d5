"""Two CPU processes (gloo): DDP and FSDP2 runs keep identical weights and controller state on both ranks and match a
single-process run on the same global batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def write_config(tmp: Path) -> str:
    cfg = json.loads((REPO / "configs" / "tiny" / "gdn_lte.json").read_text())
    cfg["lte"].update({"l1_lambda_update_steps": 2, "l1_lambda_init": 1e-3})  # dropout stays 0: ranks comparable
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def run_options(config: str, run: Path, batch: int, parallel: str) -> object:
    from hlsa.train.options import build_options

    return build_options(
        overrides={
            "model.config": config,
            "data.source": "synthetic:mqar",
            "data.seq_len": 40,
            "data.batch_size": batch,
            "data.num_pairs": 3,
            "data.num_queries": 4,
            "optim.lr": 1e-2,
            "optim.warmup_steps": 1,
            "train.steps": STEPS,
            "train.device": "cpu",
            "train.threads": 1,
            "train.parallel": parallel,
            "checkpoint.dir": str(run),
            "checkpoint.interval": 0,
            "log.progress": False,
            "log.tensorboard": False,
        }
    )


def full_state(trainer: object) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(trainer.net, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def worker(rank: int, tmp: str, port: int, modes: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    os.environ["LOCAL_RANK"] = str(rank)
    import torch.distributed as dist

    from hlsa.train.trainer import Trainer

    config = write_config(Path(tmp))
    for mode in modes:
        trainer = Trainer(run_options(config, Path(tmp) / mode, batch=1, parallel=mode))
        trainer.run()
        torch.save(full_state(trainer), Path(tmp) / f"{mode}-rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_agree_with_one_process(tmp_path: Path) -> None:
    from hlsa.train.trainer import Trainer

    modes = ["ddp", "fsdp2"]
    mp.spawn(worker, args=(str(tmp_path), free_port(), modes), nprocs=2, join=True)
    single = Trainer(run_options(write_config(tmp_path), tmp_path / "single", batch=2, parallel="ddp"))
    single.run()
    want = single.model.state_dict()
    for mode in modes:
        r0 = torch.load(tmp_path / f"{mode}-rank0.pt")
        r1 = torch.load(tmp_path / f"{mode}-rank1.pt")
        assert r0.keys() == r1.keys() and "model.l1_lambda" in r0
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (mode, k)  # identical on both ranks, lambdas and num_kept included
            # same global batch as the single process: equal up to the order of float sums
            torch.testing.assert_close(r0[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{mode} {k}")
        assert float(r0["model.l1_lambda"].abs().sum()) > 0
