"""HybridConfig refuses unknown keys and every numeric field of the wrong type or out of range, on every load path.

A bad value must stop the config with a `ValueError` naming the field, never build a model that is silently
different (a misspelt key) or that turns NaN at the first step (a NaN epsilon or theta).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from hlsa.config import FIELDS, LTE_DEFAULTS, TOP_FIELDS, HybridConfig, _flag
from tests.model.test_config import TINY, tiny

ROOT = Path(__file__).parents[2]


def test_a_misspelt_top_level_key_is_refused_with_the_likely_spelling() -> None:
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['mixer_layer'\].*did you mean 'mixer_layer' -> "):
        HybridConfig(**{k: v for k, v in TINY.items() if k != "mixer_layers"}, mixer_layer={"lte": [1]})


def test_keys_written_by_transformers_are_accepted() -> None:
    cfg = tiny(
        architectures=["HybridForCausalLM"],
        torch_dtype="float32",
        transformers_version="4.49.0",
        model_type="hlsa",
        auto_map={"AutoConfig": "x.Config"},
        _name_or_path="somewhere",
        _attn_implementation_autoset=True,
        max_length=20,  # a generation parameter, dropped by transformers on load
        num_labels=2,
    )
    assert cfg.mixers == ["gdn", "lte"]


@pytest.mark.parametrize("path", sorted(ROOT.glob("checkpoints/**/config.json")), ids=lambda p: p.parent.name)
def test_shipped_checkpoint_configs_load(path: Path) -> None:
    cfg = HybridConfig.from_pretrained(path.parent)
    assert len(cfg.mixers) == cfg.num_hidden_layers


def test_every_load_path_validates(tmp_path: Path) -> None:
    saved = tiny().to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**saved, "mixer_layer": {"lte": [1]}}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['mixer_layer'\]"):
        HybridConfig.from_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['mixer_layer'\]"):
        HybridConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**saved, "norm_eps": math.nan}))
    with pytest.raises(ValueError, match=r"norm_eps must be a finite number > 0 \(got nan\)"):
        HybridConfig.from_pretrained(tmp_path)
    # Overrides given to from_pretrained go through the same checks (transformers would set them afterwards).
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"hidden_size must be an integer >= 1 \(got 32.0\)"):
        HybridConfig.from_pretrained(tmp_path, hidden_size=32.0)
    with pytest.raises(ValueError, match=r"lte.l1_alpha must be a finite number >= 1"):
        HybridConfig.from_pretrained(tmp_path, lte={**saved["lte"], "l1_alpha": math.inf})
    assert HybridConfig.from_pretrained(tmp_path, norm_eps=1e-5).norm_eps == 1e-5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vocab_size": 64.0}, r"^vocab_size must be an integer >= 1 \(got 64.0\)"),
        ({"hidden_size": 32.0}, r"^hidden_size must be an integer >= 1"),
        ({"num_hidden_layers": True}, r"^num_hidden_layers must be an integer >= 1 \(got True\)"),
        ({"intermediate_size": 0}, r"^intermediate_size must be an integer >= 1 or null \(got 0\)"),
        ({"norm_eps": 0.0}, r"^norm_eps must be a finite number > 0 \(got 0.0\)"),
        ({"norm_eps": math.nan}, r"^norm_eps must be a finite number > 0 \(got nan\)"),
        ({"initializer_range": -0.02}, r"^initializer_range must be a finite number > 0"),
        ({"initializer_range": math.inf}, r"^initializer_range must be a finite number > 0"),
        ({"hidden_ratio": 0}, r"^hidden_ratio must be a finite number > 0"),
        ({"max_position_embeddings": 0}, r"^max_position_embeddings must be an integer >= 1"),
        ({"tie_word_embeddings": "yes"}, r"^tie_word_embeddings must be true or false"),
        ({"bos_token_id": -1}, r"^bos_token_id must be an integer >= 0 or null"),
        ({"eos_token_id": 64}, r"^eos_token_id \(64\) must be < vocab_size \(64\)"),
        ({"mixer_layers": {"lte": [True]}}, r"^mixer_layers\['lte'\] must be a list of integer layer indices"),
        ({"mixer_layers": {"lte": 1}}, r"^mixer_layers\['lte'\] must be a list of integer layer indices"),
        ({"mixers": "gdn", "mixer_layers": None}, r"^mixers must be a list with one mixer name per layer"),
        ({"lte": "window_size=8"}, r"^lte must be a mapping"),
        ({"gdn": {"num_heads": True, "head_dim": 16}}, r"^gdn.num_heads must be an integer >= 1 or null \(got True\)"),
        ({"gdn": {"num_heads": 2.0}}, r"^gdn.num_heads must be an integer >= 1 or null \(got 2.0\)"),
        ({"gdn": {"num_heads": 2, "expand_v": math.nan}}, r"^gdn.expand_v must be a finite number > 0"),
        ({"gdn": {"num_heads": 2, "use_gate": 1}}, r"^gdn.use_gate must be true or false"),
        ({"lte": {**TINY["lte"], "rope_theta": 0}}, r"^lte.rope_theta must be a finite number > 0"),
        ({"lte": {**TINY["lte"], "rope_theta": -math.inf}}, r"^lte.rope_theta must be a finite number > 0"),
        ({"lte": {**TINY["lte"], "router_bias_init": math.nan}}, r"^lte.router_bias_init must be a finite number"),
        ({"lte": {**TINY["lte"], "l1_alpha": math.nan}}, r"^lte.l1_alpha must be a finite number >= 1"),
        ({"lte": {**TINY["lte"], "l1_lambda_max": -1.0}}, r"^lte.l1_lambda_max must be a finite number >= 0"),
        ({"lte": {**TINY["lte"], "l1_alpha_neg": 0.5}}, r"^lte.l1_alpha_neg must be a finite number >= 1"),
        ({"lte": {**TINY["lte"], "l1_lambda_update_steps": 0}}, r"^lte.l1_lambda_update_steps must be an integer >= 1"),
        ({"lte": {**TINY["lte"], "l1_lambda_init": -1e-9}}, r"^lte.l1_lambda_init must be a finite number >= 0"),
        ({"lte": {**TINY["lte"], "l1_lambda_min": 2.0}}, r"^lte.l1_lambda_min \(2.0\) must be <= lte.l1_lambda_max"),
        ({"lte": {**TINY["lte"], "l1_lambda_tolerate": [1.0, 0.5]}}, r"^lte.l1_lambda_tolerate must be \[lo, hi\]"),
        ({"lte": {**TINY["lte"], "l1_lambda_tolerate": [0.9]}}, r"^lte.l1_lambda_tolerate must be \[lo, hi\]"),
        ({"lte": {**TINY["lte"], "dropout_prob": 1.0}}, r"^lte.dropout_prob must be a finite number >= 0 and < 1"),
        ({"lte": {**TINY["lte"], "threshold_step": 1.5}}, r"^lte.threshold_step must be a finite number >= 0 and <= 1"),
        ({"lte": {**TINY["lte"], "l1_lambda_signed": 1}}, r"^lte.l1_lambda_signed must be"),
        ({"lte": {**TINY["lte"], "router_grad_centered": "yes"}}, r"^lte.router_grad_centered must be"),
        ({"lte": {**TINY["lte"], "routing_freeze_steps": -1}}, r"^lte.routing_freeze_steps must be an integer >= 0"),
        ({"lte": {**TINY["lte"], "sink_size": 2.0}}, r"^lte.sink_size must be an integer >= 0"),
        ({"lte": {**TINY["lte"], "conv_dilation": [2, 0, 2]}}, r"^lte.conv_dilation must be a non-empty list"),
        ({"lte": {**TINY["lte"], "conv_size": [3, 3]}}, r"^lte.conv_size and lte.conv_dilation must have the same"),
        # Unused sub-configs are checked too: they are saved with the checkpoint and read by the tools.
        ({"nsa": {"block_size": 0}}, r"^nsa.block_size must be an integer >= 1"),
        ({"attn": {"rope_theta": math.nan}}, r"^attn.rope_theta must be a finite number > 0"),
    ],
)
def test_bad_values_are_refused_naming_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def _bad_values(check: Any) -> list[Any]:
    """Values no field of this kind accepts: flags take only booleans; numbers, choices and lists take none of these."""
    return [1, "true"] if check is _flag else [True, math.nan, math.inf, "1"]


@pytest.mark.parametrize(
    ("kind", "field", "bad"),
    [
        (kind, field, bad)
        for kind, fields in FIELDS.items()
        for field, (_, check) in fields.items()
        for bad in _bad_values(check)
    ],
)
def test_every_sub_config_field_is_checked(kind: str, field: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{kind}\.{field} must be "):
        tiny(**{kind: {**TINY.get(kind, {}), field: bad}})


@pytest.mark.parametrize("field", sorted(TOP_FIELDS))
def test_every_top_level_field_is_checked(field: str) -> None:
    bad = "1" if TOP_FIELDS[field] is _flag else math.nan
    with pytest.raises(ValueError, match=rf"^{field} must be "):
        tiny(**{field: bad})


def test_configs_do_not_share_lists() -> None:
    a, b = tiny(), tiny()
    a.lte["conv_size"].append(3)
    assert b.lte["conv_size"] == [3, 3, 3] and LTE_DEFAULTS["conv_size"] == (3, 3, 3)
