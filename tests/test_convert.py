"""The authors' checkpoints -> hlsa: config translation (window conventions) and a strict name/shape mapping.

`authors_shapes` re-derives the authors' state-dict layout from a config; it is first checked against the recorded
key/shape lists of all 14 released configs, then used to build small checkpoints in their format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hlsa.convert import convert_checkpoint, convert_state_dict, expected_shapes, translate_config

REFERENCE = Path("/work/shared/reference")
# The authors' released 0.4B GDN+LTE config as their code saves it after training: with the keys their config class
# and transformers 4.49 add on save, and `attn.receptive_margin`, which their LTE model's `forward` writes into it.
TRAINED_LTE = Path(__file__).parent / "data" / "authors_gdn_lte_0.4B_trained.json"
NAMES = sorted(p.stem for p in (REFERENCE / "authors_configs").glob("*.json")) if REFERENCE.exists() else []
needs_reference = pytest.mark.skipif(not NAMES, reason="authors' reference configs not available")


def _reference(name: str) -> tuple[dict, dict[str, list[int]]]:
    cfg = json.loads((REFERENCE / "authors_configs" / f"{name}.json").read_text())
    record = json.loads((REFERENCE / "authors_state_dicts.json").read_text())[name]
    return cfg, record["state_dict"]


def _gdn_shapes(p: str, cfg: dict) -> dict[str, list[int]]:
    d, h, k = cfg["hidden_size"], cfg["num_heads"], cfg["head_dim"]
    kd, vd, cs = h * k, int(h * k * cfg["expand_v"]), cfg["conv_size"]
    return {
        f"{p}A_log": [h], f"{p}dt_bias": [h], f"{p}q_proj.weight": [kd, d], f"{p}k_proj.weight": [kd, d],
        f"{p}v_proj.weight": [vd, d], f"{p}a_proj.weight": [h, d], f"{p}b_proj.weight": [h, d],
        f"{p}q_conv1d.weight": [kd, 1, cs], f"{p}k_conv1d.weight": [kd, 1, cs], f"{p}v_conv1d.weight": [vd, 1, cs],
        f"{p}g_proj.weight": [vd, d], f"{p}o_norm.weight": [vd // h], f"{p}o_proj.weight": [d, vd],
    }  # fmt: skip


def _attn_shapes(p: str, d: int, a: dict, head_dim: int) -> dict[str, list[int]]:
    hq, hkv = a["num_heads"], a.get("num_kv_heads") or a["num_heads"]
    out = {
        f"{p}q_proj.weight": [hq * head_dim, d], f"{p}k_proj.weight": [hkv * head_dim, d],
        f"{p}v_proj.weight": [hkv * head_dim, d], f"{p}o_proj.weight": [d, hq * head_dim],
    }  # fmt: skip
    if a.get("attn_type") == "nsa" or "block_size" in a:
        out[f"{p}g_proj.weight"] = [3 * hq, d]
    if a.get("attn_type") == "lte":
        channels = 2 * head_dim * hkv
        for i, k in enumerate(a["conv_size"]):
            out[f"{p}router.conv_stack.convs.{i}.weight"] = [channels // 2, channels // hkv, 1, k]
            out[f"{p}router.conv_stack.convs.{i}.bias"] = [channels // 2]
            channels //= 2
        out[f"{p}router.conv_stack.proj.weight"] = [hkv, channels // hkv, 1, 1]
        out[f"{p}router.conv_stack.proj.bias"] = [hkv]
    return out


def authors_shapes(cfg: dict, vocab_size: int) -> dict[str, list[int]]:
    """Key -> shape of a state dict of the authors' model for config `cfg` (lm_head listed even when tied)."""
    d, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    width = int(d * cfg.get("hidden_ratio", 4) * 2 / 3)
    inter = cfg.get("intermediate_size") or 256 * ((width + 255) // 256)
    out = {"model.embeddings.weight": [vocab_size, d]}
    attn = cfg.get("attn") or {}
    if cfg["model_type"] in ("transformer", "nsa"):
        attn, layers = dict(cfg), range(n)
    else:
        layers = attn.get("layers", [])
    if attn.get("attn_type") == "lte":
        out["model.l1_lambda"] = out["model.num_kept"] = [len(layers), attn["num_kv_heads"]]
    for i in range(n):
        p = f"model.layers.{i}."
        out[f"{p}attn_norm.weight"] = [d]
        if i in layers:
            head_dim = attn.get("head_dim") if "block_size" in attn else d // attn["num_heads"]
            out.update(_attn_shapes(f"{p}attn.", d, attn, head_dim))
        else:
            out.update(_gdn_shapes(f"{p}attn.", cfg))
        out[f"{p}mlp_norm.weight"] = [d]
        out.update({f"{p}mlp.gate_proj.weight": [inter, d], f"{p}mlp.up_proj.weight": [inter, d]})
        out[f"{p}mlp.down_proj.weight"] = [d, inter]
    out["model.norm.weight"] = [d]
    out["lm_head.weight"] = [vocab_size, d]
    return out


@needs_reference
@pytest.mark.parametrize("name", NAMES)
def test_shape_helper_matches_the_recorded_state_dicts(name: str) -> None:
    cfg, recorded = _reference(name)
    assert authors_shapes(cfg, 32000) == recorded


@needs_reference
@pytest.mark.parametrize("name", NAMES)
def test_every_released_checkpoint_maps_exactly(name: str) -> None:
    cfg, recorded = _reference(name)
    kwargs = translate_config(cfg, vocab_size=32000)
    meta = {k: torch.empty(shape, device="meta") for k, shape in recorded.items()}
    converted = convert_state_dict(meta, kwargs)
    want = expected_shapes(kwargs)
    tied = cfg["tie_word_embeddings"]
    assert set(converted) == set(want) - ({"lm_head.weight"} if tied else set())
    assert all(tuple(converted[k].shape) == want[k] for k in converted)


# What the authors' config classes add to a released config when a trained model is saved (transformers 4.49
# writes every attribute their `__init__` sets, at its default here, and its own bookkeeping keys).
SAVED_KEYS = {
    "hybrid_gated_deltanet": {"attn_mode": "chunk", "fuse_norm": True, "fuse_swiglu": True},
    "gated_deltanet": {"attn_mode": "chunk", "fuse_norm": True, "fuse_swiglu": True, "allow_neg_eigval": False,
                       "num_v_heads": None, "use_l2warp": False},
    "transformer": {"fuse_norm": True, "fuse_swiglu": True, "elementwise_affine": True, "qk_norm": False,
                    "use_l2warp": False},
    "nsa": {"fuse_norm": True, "fuse_swiglu": True, "elementwise_affine": True, "use_l2warp": False},
}  # fmt: skip
HF_SAVED = {"architectures": ["X"], "torch_dtype": "bfloat16", "transformers_version": "4.49.0", "use_cache": True}


@needs_reference
@pytest.mark.parametrize("name", NAMES)
def test_every_released_config_translates_as_saved_after_training(name: str) -> None:
    cfg = _reference(name)[0]
    saved = {**cfg, **SAVED_KEYS[cfg["model_type"]], **HF_SAVED}
    if cfg.get("attn", {}).get("attn_type") == "lte":
        saved["attn"] = {**cfg["attn"], "receptive_margin": 7}
    assert translate_config(saved) == translate_config(cfg)


@needs_reference
def test_window_conventions() -> None:
    swa = translate_config(_reference("gated_delta_net_swa_0.4B")[0])
    assert swa["attn"]["window_size"] == 1023 and swa["mixers"][:4] == ["gdn", "swa", "gdn", "swa"]
    full = translate_config(_reference("gated_delta_net_attn_1.4B")[0])
    assert full["attn"]["window_size"] is None and full["mixers"][1] == "attn" and full["attn"]["num_kv_heads"] == 8
    assert translate_config(_reference("gated_delta_net_nsa_0.4B")[0])["nsa"]["window_size"] == 511
    assert translate_config(_reference("nsa_1.4B")[0])["mixers"] == ["nsa"] * 24
    lte = translate_config(_reference("gated_delta_net_lte_0.4B")[0])
    assert lte["lte"]["window_size"] == 768 and lte["lte"]["buffer_size"] == 512 and lte["mixers"][23] == "lte"
    assert translate_config(_reference("transformer_1.4B")[0])["mixers"] == ["attn"] * 24


TINY_LTE = {
    "model_type": "hybrid_gated_deltanet", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 16,
    "expand_v": 1, "conv_size": 4, "use_gate": True, "use_short_conv": True, "hidden_ratio": 4,
    "intermediate_size": None, "hidden_act": "swish", "norm_eps": 1e-6, "initializer_range": 0.02,
    "max_position_embeddings": 256, "tie_word_embeddings": True, "vocab_size": 259, "attn_mode": "chunk",
    "fuse_cross_entropy": True, "bos_token_id": 257, "eos_token_id": 258,
    "attn": {"attn_type": "lte", "layers": [1], "num_heads": 4, "num_kv_heads": 2, "qkv_bias": False,
             "window_size": 8, "rope_theta": 10000.0, "conv_size": [3, 3, 3], "conv_dilation": [1, 1, 1],
             "dropout_prob": 0.0, "buffer_size": 6, "sink_size": 2, "routing_method": "sigmoid", "routing_grad": True,
             "routing_shared": "head", "routing_freeze_steps": 0, "l1_lambda_init": 1e-9, "l1_lambda_min": 1e-9,
             "l1_lambda_max": 1.0, "l1_alpha": 1.5, "l1_alpha_neg": 2, "l1_warmup_steps": 0,
             "l1_lambda_initial_steps": 0, "l1_lambda_update_steps": 32, "l1_lambda_shared": "head",
             "l1_lambda_tolerate": [0.95, 1.0]},
}  # fmt: skip
TINY_SWA = {
    **{k: v for k, v in TINY_LTE.items() if k != "attn"}, "model_type": "gated_deltanet", "tie_word_embeddings": False,
    "attn": {"layers": [0], "num_heads": 4, "num_kv_heads": 2, "qkv_bias": False, "window_size": 16,
             "rope_theta": 10000.0},
}  # fmt: skip


def _random_checkpoint(cfg: dict, path: Path, *, fmt: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {k: 0.02 * torch.randn(shape, generator=g) for k, shape in authors_shapes(cfg, cfg["vocab_size"]).items()}
    if cfg["tie_word_embeddings"]:
        state["lm_head.weight"] = state["model.embeddings.weight"].clone()
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path / "model.safetensors"))
    else:
        torch.save(state, path / "pytorch_model.bin")
    return state


def _trained_lte(**shrink: Any) -> dict:
    """The trained-checkpoint config, with top-level sizes replaced by `shrink` (the attn dict is kept whole)."""
    return {**json.loads(TRAINED_LTE.read_text()), **shrink}


# Small enough for a quick random-weight checkpoint; the LTE settings (window, buffer, router convs) are the 0.4B's.
SMALL_TRAINED_LTE = _trained_lte(
    hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32, vocab_size=259,
    attn={**_trained_lte()["attn"], "layers": [1], "num_heads": 4, "num_kv_heads": 2},
)  # fmt: skip


@pytest.mark.parametrize(
    ("cfg", "fmt"),
    [(TINY_LTE, "safetensors"), (TINY_SWA, "bin"), (SMALL_TRAINED_LTE, "safetensors")],
    ids=["lte-tied", "swa-bin", "lte-trained"],
)
def test_convert_command_end_to_end(tmp_path: Path, cfg: dict, fmt: str) -> None:
    from hlsa.cli import main
    from hlsa.model import HybridForCausalLM

    src, dst = tmp_path / "authors", tmp_path / "ours"
    state = _random_checkpoint(cfg, src, fmt=fmt)
    assert main(["convert", str(src), str(dst)]) == 0
    model = HybridForCausalLM.from_pretrained(dst).eval()
    ours = model.state_dict()
    for key, value in state.items():
        mapped = ours[key]
        if ".router.conv_stack." in key and key.endswith(".weight"):
            value = value[:, :, 0]  # Conv2d (1, k) -> Conv1d k
        torch.testing.assert_close(mapped, value, rtol=0, atol=0, msg=key)
    if cfg is TINY_SWA:
        assert model.config.attn["window_size"] == 15 and model.config.mixers == ["swa", "gdn"]
    logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, 259) and torch.isfinite(logits).all()


def test_strictness() -> None:
    kwargs = translate_config(TINY_LTE)
    good = {k: torch.zeros(s) for k, s in authors_shapes(TINY_LTE, 259).items()}
    assert "lm_head.weight" not in convert_state_dict(good, kwargs)
    with pytest.raises(ValueError, match="matches no rule"):
        convert_state_dict({**good, "model.extra.weight": torch.zeros(1)}, kwargs)
    with pytest.raises(ValueError, match="model.norm.weight: missing"):
        convert_state_dict({k: v for k, v in good.items() if k != "model.norm.weight"}, kwargs)
    with pytest.raises(ValueError, match="shape"):
        convert_state_dict({**good, "model.layers.0.attn.A_log": torch.zeros(3)}, kwargs)
    with pytest.raises(ValueError, match="no such key"):
        convert_state_dict({**good, "model.layers.0.attn.q_proj.bias": torch.zeros(32)}, kwargs)
    with pytest.raises(ValueError, match="differs"):
        convert_state_dict({**good, "lm_head.weight": torch.ones(259, 64)}, kwargs)
    with pytest.raises(ValueError, match="does not know"):
        translate_config({**TINY_LTE, "mystery_switch": 1})
    with pytest.raises(ValueError, match=r"attn: unknown key\(s\) \['window_sizee'\]"):  # would be dropped silently
        translate_config({**TINY_SWA, "attn": {**TINY_SWA["attn"], "window_sizee": 8}})
    with pytest.raises(ValueError, match="qk_norm"):
        translate_config({**TINY_SWA, "model_type": "transformer", "num_heads": 4, "qk_norm": True})
    with pytest.raises(ValueError, match="model_type"):
        translate_config({**TINY_LTE, "model_type": "mamba"})


def test_convert_rejects_a_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(TINY_LTE))
    with pytest.raises(ValueError, match="model.safetensors"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out")


def test_a_checkpoint_saved_after_training_converts_at_full_size() -> None:
    cfg = json.loads(TRAINED_LTE.read_text())
    kwargs = translate_config(cfg)
    assert "receptive_margin" not in kwargs["lte"] and kwargs["mixers"][1::2] == ["lte"] * 12
    meta = {k: torch.empty(shape, device="meta") for k, shape in authors_shapes(cfg, 32000).items()}
    want = expected_shapes(kwargs)
    assert {k: tuple(v.shape) for k, v in convert_state_dict(meta, kwargs).items()} == {
        k: v for k, v in want.items() if k != "lm_head.weight"
    }


@pytest.mark.parametrize("margin", [6, 8, True, "7"])
def test_a_receptive_margin_that_disagrees_with_the_router_is_refused(margin: Any) -> None:
    cfg = _trained_lte()
    with pytest.raises(ValueError, match=r"attn.receptive_margin=.* conv_dilation \[2, 2, 2\] gives 7"):
        translate_config({**cfg, "attn": {**cfg["attn"], "receptive_margin": margin}})


def test_unknown_lte_keys_are_still_refused() -> None:
    cfg = _trained_lte()
    with pytest.raises(ValueError, match=r"lte: unknown field\(s\) \['receptive_margins'\]"):
        translate_config({**cfg, "attn": {**cfg["attn"], "receptive_margins": 7}})


def _cli(*args: str) -> int:
    from hlsa.cli import main

    return main(["convert", *args])


def test_the_destination_must_be_new_and_outside_the_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "authors"
    _random_checkpoint(TINY_LTE, src, fmt="safetensors")
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    used = tmp_path / "used"
    used.mkdir()
    (used / "tokenizer.json").write_text("{}")  # another model's tokenizer must not end up beside the new weights
    for dst, message in [
        (src, "is the source directory or inside it"),
        (src / "converted", "is the source directory or inside it"),
        (used, "exists and is not an empty directory"),
        (src / "config.json", "is the source directory or inside it"),
    ]:
        assert _cli(str(src), str(dst)) == 2
        assert message in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    assert [f.name for f in used.iterdir()] == ["tokenizer.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(str(src), str(empty)) == 0
    assert sorted(f.name for f in empty.iterdir()) == ["config.json", "model.safetensors"]


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    src = tmp_path / "authors"
    _random_checkpoint({**TINY_LTE, "attn": {**TINY_LTE["attn"], "receptive_margin": 5}}, src, fmt="safetensors")
    assert _cli(str(src), str(tmp_path / "out")) == 2
    assert sorted(f.name for f in tmp_path.iterdir()) == ["authors"]


def test_a_write_that_fails_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import safetensors.torch

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    src = tmp_path / "authors"
    _random_checkpoint(TINY_LTE, src, fmt="safetensors")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(src, tmp_path / "out")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["authors"]


def _sharded(tmp_path: Path, weight_map: Any) -> Path:
    src = tmp_path / "authors"
    state = _random_checkpoint(TINY_LTE, src, fmt="safetensors")
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    if weight_map == "all":
        weight_map = dict.fromkeys(state, "model-00001-of-00001.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src


@pytest.mark.parametrize("linked", [False, True], ids=["file", "hf-cache-link"])
def test_a_sharded_checkpoint_converts(tmp_path: Path, linked: bool) -> None:
    src = _sharded(tmp_path, "all")
    if linked:  # as in a Hugging Face cache snapshot, whose files are links into blobs/ outside it
        shard = src / "model-00001-of-00001.safetensors"
        (tmp_path / "blobs").mkdir()
        shard.rename(tmp_path / "blobs" / "0123abcd")
        shard.symlink_to(Path("..") / "blobs" / "0123abcd")
    assert _cli(str(src), str(tmp_path / "out")) == 0


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"x": "../../../etc/passwd"}, "shard '../../../etc/passwd' lies outside the checkpoint directory"),
        ({"x": "/etc/passwd"}, "shard '/etc/passwd' lies outside the checkpoint directory"),
        ({"x": "sub/../../authors2/model.safetensors"}, "lies outside the checkpoint directory"),
        ({"x": "model-00002-of-00002.safetensors"}, "shard 'model-00002-of-00002.safetensors' is missing"),
        ({"x": 3}, "'weight_map' must be a non-empty object"),
        ([], "'weight_map' must be a non-empty object"),
    ],
)
def test_a_malformed_or_escaping_index_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, weight_map: Any, message: str
) -> None:
    src = _sharded(tmp_path, weight_map)
    assert _cli(str(src), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hlsa: error: {src / 'model.safetensors.index.json'}: ") and message in err


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        ("config.json", "{not json", "config.json: not readable as JSON"),
        ("config.json", "[1, 2]", "config.json: expected a JSON object, got list"),
        ("config.json", json.dumps({**TINY_LTE, "hidden_size": "64"}), "config.json: hidden_size must be an integer"),
        ("config.json", json.dumps({**TINY_LTE, "hidden_ratio": None, "intermediate_size": None}), "hidden_ratio"),
        ("config.json", json.dumps({**TINY_LTE, "norm_eps": float("nan")}), "config.json: norm_eps must be a finite"),
        ("config.json", json.dumps({**TINY_LTE, "attn": {**TINY_LTE["attn"], "layers": 1}}), "attn must be an object"),
        ("config.json", json.dumps({**TINY_LTE, "attn": {**TINY_LTE["attn"], "layers": [True]}}), "attn.layers"),
        ("model.safetensors", "", "model.safetensors: not a readable weights file"),
        ("model.safetensors", "\x00" * 100, "model.safetensors: not a readable weights file"),
        ("model.safetensors.index.json", "{", "model.safetensors.index.json: not readable as JSON"),
    ],
    ids=["bad-json", "not-object", "str-size", "null-ratio", "nan-eps", "int-layers", "bool-layer", "empty-weights",
         "zero-weights", "bad-index"],
)  # fmt: skip
def test_garbage_input_files_are_usage_errors_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, file: str, text: str, message: str
) -> None:
    src = tmp_path / "authors"
    _random_checkpoint(TINY_LTE, src, fmt="safetensors")
    if file.endswith("index.json"):
        (src / "model.safetensors").unlink()
    (src / file).write_text(text)
    assert _cli(str(src), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlsa: error: ") and message in err and "Traceback" not in err


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    class Planted:
        def __reduce__(self) -> tuple:
            return (Path.touch, (tmp_path / "pwned",))

    src = tmp_path / "authors"
    _random_checkpoint(TINY_SWA, src, fmt="bin")
    torch.save({"model.norm.weight": Planted()}, src / "pytorch_model.bin")
    assert _cli(str(src), str(tmp_path / "out")) == 2
    assert "pytorch_model.bin: not a readable weights file" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
