"""HybridConfig validation: every error names the field and the fix; the config is never mutated."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from hlsa.config import HybridConfig

CONFIGS = Path(__file__).parents[2] / "configs"


# A small valid config (GDN then LTE) that the tests of this folder vary one field at a time.
TINY: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "gdn": {"num_heads": 2, "head_dim": 16},
    "mixer_layers": {"lte": [1]},
    "lte": {"num_heads": 4, "num_kv_heads": 2, "window_size": 8, "buffer_size": 4, "sink_size": 2},
}


def tiny(**overrides: Any) -> HybridConfig:
    return HybridConfig(**{**TINY, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lte": {"num_heads": 4, "num_kv_heads": 3}}, r"lte.num_heads \(4\) must be divisible by lte.num_kv_heads"),
        (
            {"lte": {"num_heads": 4, "window_size": 8, "buffer_size": 1, "sink_size": 2}},
            r"lte.buffer_size \(1\) must be >= lte.sink_size \(2\)",
        ),
        ({"mixer_layers": {"mamba": [1]}}, r"unknown mixer 'mamba'"),
        ({"mixers": ["gdn", "foo"], "mixer_layers": None}, r"mixers\[1\]: unknown mixer 'foo'"),
        ({"mixer_layers": {"lte": [2]}}, r"layer index 2 is out of range for num_hidden_layers=2"),
        ({"mixer_layers": {"lte": [1], "swa": [1]}}, r"layer 1 is assigned to both"),
        ({"lte": {"num_heads": 4, "window_size": 0}}, r"lte.window_size must be an integer >= 1"),
        (
            {"mixer_layers": {"swa": [1]}, "attn": {"num_heads": 4, "window_size": 0}},
            r"attn.window_size must be an integer >= 1",
        ),
        ({"mixer_layers": {"swa": [1]}, "attn": {"num_heads": 4}}, r"attn.window_size is required"),
        (
            {
                "mixer_layers": {"nsa": [1]},
                "nsa": {"num_heads": 4, "num_kv_heads": 1, "block_size": 64, "block_counts": 100},
                "max_position_embeddings": 4096,
            },
            r"nsa.block_size \* nsa.block_counts .* the selected blocks cannot be held",
        ),
        (
            {"lte": {"num_heads": 4, "window_size": 3}},
            r"lte.window_size \(3\) must be >= the router's receptive margin",
        ),
        ({"lte": {"num_heads": 4, "routing_shared": "all"}}, r"lte.routing_shared must be 'head' or 'layer'"),
        ({"lte": {"num_heads": 4, "train_selection": "topk"}}, r"lte.train_selection must be .positive. or .buffer."),
        ({"lte": {"num_heads": 4, "conv_size": [2, 3, 3]}}, r"conv_size entries must be odd"),
        ({"lte": {"num_heads": 4, "bogus": 1}}, r"lte: unknown field\(s\) \['bogus'\]"),
        ({"backend": "cuda"}, r"backend: 'cuda' is not one of"),
        ({"mixers": ["gdn"], "mixer_layers": None}, r"mixers has 1 entries but num_hidden_layers=2"),
        # Caught by the config, not later by the layer constructors (a bad config could be saved and shipped).
        ({"lte": {"num_heads": 4, "head_dim": 0}}, r"lte.head_dim must be an integer >= 1 or null"),
        ({"lte": {"num_heads": 4, "head_dim": -2}}, r"lte.head_dim must be an integer >= 1 or null"),
        ({"gdn": {"num_heads": 2, "head_dim": 0}}, r"gdn.head_dim must be an integer >= 1 or null"),
        ({"gdn": {"num_heads": 2, "expand_v": 1.3}}, r"gdn.expand_v \* head_dim must be a positive integer"),
        ({"gdn": {"num_heads": 2, "conv_size": 0}}, r"gdn.conv_size must be an integer >= 1"),
        ({"hidden_act": "gelu"}, r"hidden_act must be 'swish'"),
        ({"lte": {"num_heads": 4, "conv_size": [3.0, 3, 3]}}, r"lte.conv_size must be a non-empty list of integers"),
    ],
)
def test_validation_messages(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_mixers_and_defaults():
    cfg = tiny()
    assert cfg.mixers == ["gdn", "lte"]
    assert cfg.lte["head_dim"] == 8 and cfg.lte["conv_size"] == [3, 3, 3]
    assert cfg.lte_margin == 6 and cfg.lte_layers == [1]
    # SwiGLU width: 256 * ceil(8d/3 / 256) -> 2816 at d=1024.
    assert HybridConfig(hidden_size=1024, gdn={"num_heads": 8}).intermediate_size == 2816


def test_not_mutated_and_roundtrip(tmp_path):
    cfg = tiny()
    before = copy.deepcopy(cfg.to_dict())
    from hlsa import HybridForCausalLM

    HybridForCausalLM(cfg)
    assert cfg.to_dict() == before
    cfg.save_pretrained(tmp_path)
    again = HybridConfig.from_pretrained(tmp_path)
    assert again.mixers == cfg.mixers and again.lte == cfg.lte


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("**/*.json")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = HybridConfig.from_json_file(path)
    assert len(cfg.mixers) == cfg.num_hidden_layers
    assert json.loads(path.read_text())["model_type"] == "hlsa"


def test_typed_views():
    import dataclasses

    from hlsa.config import FIELDS, AttnConfig, LTEConfig, LTEControllerConfig

    cfg = tiny(mixers=["swa", "attn", "lte"], mixer_layers=None, num_hidden_layers=3,
               attn={"num_heads": 4, "window_size": 6})  # fmt: skip
    swa, full = cfg.mixer_config("swa"), cfg.mixer_config("attn")
    assert isinstance(swa, AttnConfig) and swa.window_size == 6 and full.window_size is None
    assert swa.num_kv_heads == 4 and swa.head_dim == 8  # derived defaults are resolved in the views too
    lte = cfg.mixer_config("lte")
    assert isinstance(lte, LTEConfig) and lte.conv_size == (3, 3, 3) and lte.window_size == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        lte.window_size = 9
    assert isinstance(cfg.lte_controller, LTEControllerConfig) and cfg.lte_controller.l1_lambda_tolerate == (0.95, 1.0)
    # The model's and the controller's fields split the lte section exactly; config.json keeps one lte object.
    model_fields = {f.name for f in dataclasses.fields(LTEConfig)}
    controller_fields = {f.name for f in dataclasses.fields(LTEControllerConfig)}
    assert not model_fields & controller_fields and model_fields | controller_fields == set(FIELDS["lte"])
    assert set(cfg.to_dict()["lte"]) == set(FIELDS["lte"])
