"""`hlsa.loading`: a checkpoint loads as the model its config describes, or not at all, with an error naming the file
and the fix; tokenizers come from local paths only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from hlsa.cli import main
from hlsa.errors import UsageError
from hlsa.loading import check_output_path, load_model, load_tokenizer, pick_device

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "demo"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A copy of the shipped GDN+SWA demo checkpoint to damage."""
    return Path(shutil.copytree(SHIPPED / "gdn_swa", tmp_path / "gdn_swa"))


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlsa: error: ") and "Traceback" not in err, err
    return err


def test_every_shipped_checkpoint_loads_completely() -> None:
    for path in sorted(SHIPPED.iterdir()):
        model = load_model(path)
        assert not model.training and len(load_tokenizer(path)) == model.config.vocab_size == 256


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 3, "mixers": ["gdn", "swa", "gdn"]}, r"missing from the weights .*model\.layers\.2\."),
        ({"num_hidden_layers": 1, "mixers": ["gdn"]}, r"in the weights but not in the model .*model\.layers\.1\."),
        ({"mixers": ["gdn", "gdn"]}, r"of another shape in the weights"),
        ({"intermediate_size": 128}, r"of another shape in the weights: .*mlp"),
    ],
)
def test_a_config_that_does_not_match_the_weights_is_refused(ckpt: Path, change: dict, message: str, capsys) -> None:
    edit_config(ckpt, **change)
    with pytest.raises(UsageError, match=message):
        load_model(ckpt)
    err = cli_error(capsys, ["generate", str(ckpt), "--prompt", "k1", "--device", "cpu"])
    assert "do not match its config.json" in err and "--allow-partial-weights" in err


def test_allow_partial_weights_loads_with_a_warning(ckpt: Path, capsys) -> None:
    edit_config(ckpt, num_hidden_layers=3, mixers=["gdn", "swa", "gdn"])
    with pytest.warns(UserWarning, match="loaded anyway"):
        assert load_model(ckpt, allow_partial=True).config.num_hidden_layers == 3
    argv = ["generate", str(ckpt), "--prompt", "k1", "--max-new-tokens", "1", "--device", "cpu"]
    assert main([*argv, "--allow-partial-weights"]) == 0
    assert "hlsa: warning: the weights in" in capsys.readouterr().err


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, r"model\.safetensors: not a complete safetensors file .*export it again"),
        (lambda p: p.write_bytes(b""), r"model\.safetensors: not a complete safetensors file"),
        (Path.unlink, r"model\.safetensors: no such file \(the model weights\)"),
        (_directory, r"model\.safetensors is a directory or special file, not the model weights"),
    ],
)
def test_damaged_weights_are_a_usage_error(ckpt: Path, damage, message: str, capsys) -> None:
    damage(ckpt / "model.safetensors")
    err = cli_error(capsys, ["generate", str(ckpt), "--prompt", "k1", "--device", "cpu"])
    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"config\.json: not valid JSON"),
        ("[1, 2]", r"config\.json: expected a JSON object, got list"),
        ('{"model_type": "llama"}', r"model_type is 'llama', not 'hlsa'"),
        (b"\xff\xfe".decode("latin-1"), r"config\.json: not valid JSON"),
    ],
)
def test_a_garbage_config_is_a_usage_error(ckpt: Path, text: str, message: str, capsys) -> None:
    (ckpt / "config.json").write_text(text, encoding="latin-1")
    for argv in (["generate", str(ckpt), "--prompt", "k1"], ["eval", "ppl", str(ckpt), "--data", "x.txt"]):
        assert re.search(message, cli_error(capsys, [*argv, "--device", "cpu"]))


def test_an_unreadable_file_is_reported_as_unreadable(ckpt: Path, monkeypatch) -> None:
    """Permission bits cannot stop root, so opening the weights is made to fail as it would for an unreadable file."""
    weights = ckpt / "model.safetensors"
    real = Path.open

    def denied(self: Path, *args: object, **kwargs: object) -> object:
        if self == weights:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    message = r"model\.safetensors exists but is not readable \(permission denied\); give this user read access to"
    with pytest.raises(UsageError, match=message):
        load_model(ckpt)


def test_a_shard_index_may_not_point_outside_the_checkpoint(ckpt: Path) -> None:
    (ckpt / "model.safetensors").rename(ckpt / "shard.safetensors")
    index = {"weight_map": {"model.embeddings.weight": "../../../etc/passwd"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=r"shard '\.\./\.\./\.\./etc/passwd' is not a file of"):
        load_model(ckpt)


def test_a_tokenizer_name_never_reaches_for_the_hub(ckpt: Path, capsys) -> None:
    err = cli_error(capsys, ["generate", str(ckpt), "--tokenizer", "gpt2", "--prompt", "hi", "--device", "cpu"])
    assert "tokenizer gpt2 is not a local directory; hlsa loads tokenizers from local directories only" in err


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("bogus", "meta", "cuda:99"):
        with pytest.raises(UsageError, match="device"):
            pick_device(bad)


def test_check_output_path(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "new" / "a.json") == tmp_path / "new" / "a.json"
    assert not (tmp_path / "new" / "a.json").exists()  # checked, not left behind
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot create its directory"):
        check_output_path(tmp_path / "file" / "a.json")
    with pytest.raises(UsageError, match="is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(UsageError, match=r"must end in \.png or \.svg"):
        check_output_path(tmp_path / "a.txt", suffixes=(".png", ".svg"))
