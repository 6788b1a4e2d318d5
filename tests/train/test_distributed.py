"""Two CPU processes (gloo): DDP and FSDP2 runs keep identical weights and controller state on both ranks and match a
single-process run on the same global batch; checkpoints move between 2 ranks and 1 process."""

from __future__ import annotations

import json
import os
import shutil
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


def run_options(config: str, run: Path, batch: int, parallel: str, **extra: object) -> object:
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
            **extra,
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


RESUME = {"optim.min_lr_ratio": 1.0}  # constant lr after warm-up: a 3-step run is the start of a 5-step run


def resume_worker(rank: int, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    os.environ["LOCAL_RANK"] = str(rank)
    import torch.distributed as dist

    from hlsa.train.trainer import Trainer

    config, tmp_path = write_config(Path(tmp)), Path(tmp)
    Trainer(run_options(config, tmp_path / "two", 1, "fsdp2", **RESUME, **{"train.steps": 3})).run()
    resumed = Trainer(
        run_options(
            config, tmp_path / "one_then_two", 1, "fsdp2", **RESUME, **{"train.steps": 5, "checkpoint.resume": True}
        )
    )
    assert resumed.step == 3
    resumed.run()
    state = full_state(resumed)
    if rank == 0:
        torch.save(state, tmp_path / "one_then_two.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_checkpoints_resume_across_world_sizes(tmp_path: Path) -> None:
    """3 steps on 1 process then 2 more on 2 FSDP2 ranks, and 3 steps on 2 ranks then 2 more on 1 process, both equal
    an unbroken 5-step run: the same examples in the same steps (synthetic data continues exactly), optimizer moments
    and LTE controller state carried over."""
    from hlsa.train.trainer import Trainer

    config = write_config(tmp_path)
    Trainer(run_options(config, tmp_path / "one", 2, "ddp", **RESUME, **{"train.steps": 3})).run()
    shutil.copytree(tmp_path / "one", tmp_path / "one_then_two")
    mp.spawn(resume_worker, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    two_then_one = Trainer(
        run_options(config, tmp_path / "two", 2, "ddp", **RESUME, **{"train.steps": 5, "checkpoint.resume": True})
    )
    assert two_then_one.step == 3
    two_then_one.run()
    unbroken = Trainer(run_options(config, tmp_path / "unbroken", 2, "ddp", **RESUME, **{"train.steps": 5}))
    unbroken.run()
    want = unbroken.model.state_dict()
    for name, got in (("1->2", torch.load(tmp_path / "one_then_two.pt")), ("2->1", two_then_one.model.state_dict())):
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    assert float(want["model.l1_lambda"].abs().sum()) > 0
