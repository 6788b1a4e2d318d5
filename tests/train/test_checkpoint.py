"""Checkpoint files: atomic replacement, the `latest` pointer, pruning, and the RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hlsa.config import HybridConfig
from hlsa.errors import UsageError
from hlsa.train import checkpoint as ckpt


def save(root: Path, step: int, value: float, keep: int = 2) -> Path:
    config = HybridConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, gdn={"num_heads": 2})
    emb = torch.full((4, 2), value)
    sd = {"embed.weight": emb, "lm_head.weight": emb}  # tied: shares storage
    return ckpt.save_checkpoint(
        root, step, config=config, model_sd=sd, optim_sd={"v": value}, trainer_state={"step": step}, keep=keep
    )


def test_save_load_latest_and_prune(tmp_path: Path) -> None:
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save(tmp_path, step, float(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000003"
    model_sd, optim_sd, state = ckpt.load_checkpoint(latest)
    assert float(model_sd["lm_head.weight"][0, 0]) == 3.0 and optim_sd == {"v": 3.0} and state == {"step": 3}
    assert (latest / "config.json").is_file()


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 5, 1.0)
    save(tmp_path, 5, 2.0)
    model_sd, _, _ = ckpt.load_checkpoint(tmp_path / "step-00000005")
    assert float(model_sd["embed.weight"][0, 0]) == 2.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


def test_torn_checkpoint_is_reported(tmp_path: Path) -> None:
    save(tmp_path, 1, 1.0)
    (tmp_path / "step-00000001" / "trainer.pt").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.latest_checkpoint(tmp_path)


def test_rng_round_trip() -> None:
    state = ckpt.rng_state()
    a = (torch.rand(3), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


class Planted:
    """Unpickling this runs `touch <marker>` (what a crafted checkpoint would do with any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["trainer.pt", "optimizer.pt"])
def test_a_planted_pickle_is_refused_not_run(tmp_path: Path, name: str) -> None:
    save(tmp_path, 1, 1.0)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": Planted(marker)}, tmp_path / "step-00000001" / name)
    with pytest.raises(UsageError, match=f"refusing to load .*{name}.*could run code"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert not marker.exists()


def test_trainer_state_round_trips_as_plain_data(tmp_path: Path) -> None:
    """The RNG states (numpy's included) load with weights_only=True and restore the same streams."""
    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    config = HybridConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, gdn={"num_heads": 2})
    ckpt.save_checkpoint(tmp_path, 1, config=config, model_sd={}, optim_sd={}, trainer_state={"rng": state})
    loaded = torch.load(tmp_path / "step-00000001" / "trainer.pt", weights_only=True)
    ckpt.set_rng_state(loaded["rng"])
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


@pytest.mark.parametrize("target", ["../other/step-00000001", "/etc", "step-1/../../x", "step-00000001/.."])
def test_latest_cannot_lead_outside_the_run(tmp_path: Path, target: str) -> None:
    save(tmp_path / "other", 1, 1.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text(target)
    with pytest.raises(UsageError, match="not a step directory"):
        ckpt.latest_checkpoint(run)


def test_a_step_symlink_out_of_the_run_is_refused(tmp_path: Path) -> None:
    save(tmp_path / "other", 1, 1.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "step-00000001").symlink_to(tmp_path / "other" / "step-00000001")
    (run / "latest").write_text("step-00000001")
    with pytest.raises(UsageError, match="leads outside"):
        ckpt.latest_checkpoint(run)


@pytest.mark.parametrize("name", ["optimizer.pt", "trainer.pt", "model.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_files_are_named(tmp_path: Path, name: str, damage: str) -> None:
    path = save(tmp_path, 1, 1.0) / name
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint\n" * 9, "empty": b""}[damage])
    # garbage that torch reads as a pickle stops at its first opcode that is not plain data
    with pytest.raises(UsageError, match=f"{name}(: it is damaged| is unreadable: truncated)"):
        ckpt.load_checkpoint(tmp_path / "step-00000001")


def test_an_unreadable_file_is_reported_as_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(tmp_path, 1, 1.0) / "optimizer.pt"
    real = Path.open

    def denied(self: Path, *args: object, **kwargs: object) -> object:  # chmod 000 does not stop root, who runs CI
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(UsageError, match="optimizer.pt exists but is not readable .*give this user read access"):
        ckpt.load_checkpoint(tmp_path / "step-00000001")


def test_a_missing_file_is_reported_as_missing(tmp_path: Path) -> None:
    (save(tmp_path, 1, 1.0) / "trainer.pt").unlink()
    with pytest.raises(UsageError, match="trainer.pt: no such file .*incomplete; delete this step directory"):
        ckpt.load_checkpoint(tmp_path / "step-00000001")


def test_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o027)
    try:
        step = save(tmp_path, 1, 1.0)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in step.iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes


def test_stale_temporaries_are_removed_and_an_interrupted_resave_is_restored(tmp_path: Path) -> None:
    save(tmp_path, 1, 1.0)
    save(tmp_path, 2, 2.0)
    (tmp_path / ".tmp-step-00000003-999").mkdir()  # killed while writing step 3
    (tmp_path / ".tmp-step-00000003-999" / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / ".latest.tmp-999").write_text("step-00000003")
    (tmp_path / "step-00000002").rename(tmp_path / ".old-step-00000002-999")  # killed between a re-save's renames
    ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    model_sd, _, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert float(model_sd["embed.weight"][0, 0]) == 2.0


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    save(tmp_path, 1, 1.0)
    real = torch.save

    def full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real(obj, f, *args, **kwargs)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ckpt.CheckpointWriteError, match="the disk is full.*step-00000001\\) is kept.*--resume"):
        save(tmp_path, 2, 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000001"


def test_an_older_trainer_state_with_a_numpy_array_says_what_to_do(tmp_path: Path) -> None:
    import numpy as np

    save(tmp_path, 1, 1.0)
    torch.save({"rng": {"numpy": np.random.get_state()}}, tmp_path / "step-00000001" / "trainer.pt")
    with pytest.raises(UsageError, match="numpy.* cannot be resumed, but its weights can be trained further with"):
        ckpt.load_checkpoint(tmp_path / "step-00000001")
