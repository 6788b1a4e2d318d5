"""Convert a checkpoint of the authors' code (their fla fork) into an hlsa checkpoint.

Supported source `model_type`s: `hybrid_gated_deltanet` (GDN + LTE/NSA/attention layers), `gated_deltanet` (GDN,
optionally with an `attn` dict of full or sliding-window attention layers), `transformer` and `nsa`.

Two steps, both strict:

1. `translate_config`: the authors' config.json -> `HybridConfig` keyword arguments. Window conventions differ
   (docs/design.md): their SWA/transformer `window_size=w` is a flash-attn window of `w` tokens including the query,
   i.e. our `W = w - 1`; their NSA sliding branch is the same (`512 -> 511`); their LTE band is already `W + 1`, so
   LTE windows are copied unchanged. Settings we do not implement (`qk_norm`, negative eigenvalues, ...) raise.
   The one key their code writes into the config at run time, `attn.receptive_margin` (LTE `forward`), is
   checked against the router and dropped; any other unknown key raises.
2. `convert_state_dict`: one explicit old -> new name table (`RULES`), a shape check of every tensor against an
   hlsa model of the translated config built on the meta device, and a check that every key of the model is filled
   and no source key is left over. Any mismatch raises `ValueError` listing the offending keys.

The only tensor change: the LTE router's `Conv2d` weights `[C_out, C_in/g, 1, k]` become `Conv1d` weights
`[C_out, C_in/g, k]`.

`convert_checkpoint` runs no code from the checkpoint (safetensors, or `torch.load(weights_only=True)`), reads no
shard that a sharded index places outside the checkpoint directory, writes only into a new (or empty) directory
outside the source, and renames it into place only when complete. Every bad input is a `UsageError` naming its file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from hlsa.config import HF_CONFIG_KEYS, TOP_FIELDS, HybridConfig, is_int
from hlsa.errors import UsageError

AUTHOR_MODEL_TYPES = ("hybrid_gated_deltanet", "gated_deltanet", "transformer", "nsa")

# Source config keys that carry no model semantics here: fla's kernel/fusion switches and transformers' own keys.
_IGNORED_KEYS = {
    "attn_mode", "fuse_cross_entropy", "fuse_linear_cross_entropy", "fuse_norm", "fuse_swiglu", "use_l2warp",
    "use_return_dict",
} | HF_CONFIG_KEYS  # fmt: skip
_COMMON_KEYS = (
    "hidden_size", "num_hidden_layers", "hidden_ratio", "intermediate_size", "hidden_act", "norm_eps",
    "initializer_range", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "vocab_size",
)  # fmt: skip
_GDN_KEYS = ("num_heads", "head_dim", "expand_v", "use_short_conv", "conv_size", "use_gate")
# Settings of the authors' code that hlsa does not implement: key -> the only accepted value.
_UNSUPPORTED = {"qk_norm": False, "allow_neg_eigval": False, "elementwise_affine": True, "num_v_heads": None}


def _copy(src: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: src[k] for k in keys if k in src}


def _check_supported(cfg: Mapping[str, Any], where: str) -> None:
    for key, ok in _UNSUPPORTED.items():
        value = cfg.get(key, ok)
        if key == "num_v_heads" and value is not None and value == cfg.get("num_heads"):
            continue
        if value != ok:
            raise UsageError(f"{where}.{key}={value!r} is not supported by hlsa (only {ok!r}); cannot convert")


def _ours_minus_one(window: int | None, where: str) -> int | None:
    """Their flash-attn window of `w` tokens (query included) is our `W = w - 1`."""
    if window is None:
        return None
    if not isinstance(window, int) or window < 2:
        raise UsageError(f"{where}.window_size must be an integer >= 2 or null, got {window!r}")
    return window - 1


_ATTN_KEYS = ("num_heads", "num_kv_heads", "qkv_bias", "rope_theta")  # and window_size, translated
_NSA_KEYS = ("num_heads", "num_kv_heads", "head_dim", "qkv_bias", "block_size", "block_counts", "rope_theta")


def _attn_sub(src: Mapping[str, Any]) -> dict[str, Any]:
    sub = _copy(src, _ATTN_KEYS)
    sub["window_size"] = _ours_minus_one(src.get("window_size"), "attn")
    return sub


def _nsa_sub(src: Mapping[str, Any]) -> dict[str, Any]:
    sub = _copy(src, _NSA_KEYS)
    sub["window_size"] = _ours_minus_one(src.get("window_size", 512), "nsa")
    return sub


def _lte_sub(src: Mapping[str, Any]) -> dict[str, Any]:
    # The authors' LTE keys are ours; their band is already W + 1 tokens, so window_size is copied unchanged.
    return {k: v for k, v in src.items() if k not in ("attn_type", "layers", "receptive_margin")}


def _check_receptive_margin(attn: Mapping[str, Any], config: HybridConfig) -> None:
    """The authors' LTE `forward` writes `attn.receptive_margin = receptive field // 2 + 1` into the model config,
    so every checkpoint they saved after training carries it. hlsa derives the margin from `conv_size` and
    `conv_dilation`, so the key is dropped, but only when it agrees with them: another value means a router
    other than the one these weights were trained with."""
    if "receptive_margin" not in attn:
        return
    given, expected = attn["receptive_margin"], config.lte_receptive_field // 2 + 1
    if type(given) is not int or given != expected:
        raise UsageError(
            f"attn.receptive_margin={given!r} does not match the router: conv_size {config.lte['conv_size']} with "
            f"conv_dilation {config.lte['conv_dilation']} gives {expected} (receptive field // 2 + 1); the config "
            "was edited after training, so fix conv_size/conv_dilation or remove receptive_margin"
        )


def _fla_intermediate_size(cfg: Mapping[str, Any]) -> int:
    """fla's rule: `256 * ceil(int(d * ratio * 2 / 3) / 256)` (SwiGLU width), used when the config leaves it null."""
    if cfg.get("intermediate_size") is not None:
        return cfg["intermediate_size"]  # checked by HybridConfig
    width = int(cfg["hidden_size"] * cfg.get("hidden_ratio", 4) * 2 / 3)
    return 256 * ((width + 255) // 256)


def _hybrid_layers(cfg: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Mixers and sub-configs of the GDN-based types (`gated_deltanet`, `hybrid_gated_deltanet`)."""
    n = cfg["num_hidden_layers"]
    mixers, subs = ["gdn"] * n, {"gdn": _copy(cfg, _GDN_KEYS)}
    attn = cfg.get("attn")
    if attn is None:
        return mixers, subs
    if not isinstance(attn, Mapping) or not isinstance(attn.get("layers"), list):
        raise UsageError(f"attn must be an object with a list of layer indices in 'layers' (got {attn!r})")
    attn_type = attn.get("attn_type", "attn")
    keys = {"attn": _ATTN_KEYS, "nsa": _NSA_KEYS}.get(attn_type)
    unknown = sorted(set(attn) - {"attn_type", "layers", "window_size", *(keys or ())}) if keys else []
    if unknown:  # a key dropped here would silently change the model (LTE's keys are ours and checked by HybridConfig)
        raise UsageError(f"attn: unknown key(s) {unknown} for attn_type {attn_type!r}; cannot convert")
    if attn_type == "lte":
        kind, subs["lte"] = "lte", _lte_sub(attn)
    elif attn_type == "nsa":
        kind, subs["nsa"] = "nsa", _nsa_sub(attn)
    elif attn_type == "attn":
        subs["attn"] = _attn_sub(attn)
        kind = "attn" if subs["attn"]["window_size"] is None else "swa"
    else:
        raise UsageError(f"attn.attn_type={attn_type!r} is not one of 'attn', 'nsa', 'lte'")
    for i in attn["layers"]:
        if not is_int(i) or not 0 <= i < n:
            raise UsageError(f"attn.layers: {i!r} is not a layer index in 0..{n - 1}")
        mixers[i] = kind
    return mixers, subs


def translate_config(cfg: Mapping[str, Any], *, vocab_size: int | None = None) -> dict[str, Any]:
    """The authors' config dict -> `HybridConfig(**kwargs)` keyword arguments.

    Args:
        cfg: their config.json, parsed.
        vocab_size: used when `cfg` has no `vocab_size` (pass the embedding's row count); fla's default is 32000.
    """
    model_type = cfg.get("model_type")
    if model_type not in AUTHOR_MODEL_TYPES:
        raise UsageError(f"config model_type={model_type!r}; expected one of {AUTHOR_MODEL_TYPES}")
    _check_supported(cfg, "config")
    # The fields computed with below, checked by HybridConfig's own rules first; the rest are checked when the
    # translated config is built.
    for key in ("hidden_size", "num_hidden_layers", "hidden_ratio"):
        TOP_FIELDS[key](key, cfg.get(key, 4 if key == "hidden_ratio" else None))
    if model_type in ("gated_deltanet", "hybrid_gated_deltanet"):
        mixers, subs = _hybrid_layers(cfg)
    elif model_type == "transformer":
        # fla's transformer rounds head_dim down; hlsa would refuse a hidden_size that num_heads does not divide
        heads, subs = cfg.get("num_heads"), {"attn": _attn_sub(cfg)}
        if is_int(heads) and heads > 0:  # else HybridConfig names the bad num_heads
            subs["attn"]["head_dim"] = cfg["hidden_size"] // heads
        mixers = ["attn" if subs["attn"]["window_size"] is None else "swa"] * cfg["num_hidden_layers"]
    else:
        subs = {"nsa": _nsa_sub(cfg)}
        mixers = ["nsa"] * cfg["num_hidden_layers"]
    known = set(_COMMON_KEYS) | set(_GDN_KEYS) | _IGNORED_KEYS | set(_UNSUPPORTED) | {"attn"}
    known |= {"num_kv_heads", "qkv_bias", "rope_theta", "window_size", "block_size", "block_counts"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UsageError(f"config has key(s) {unknown} that this converter does not know; refusing to guess")
    out = _copy(cfg, _COMMON_KEYS)
    out["vocab_size"] = cfg.get("vocab_size", vocab_size or 32000)
    out["intermediate_size"] = _fla_intermediate_size(cfg)
    out["mixers"] = mixers
    out.update(subs)
    config = HybridConfig(**out)
    if "lte" in subs:
        _check_receptive_margin(cfg["attn"], config)
    return out


def _squeeze_conv2d(t: torch.Tensor) -> torch.Tensor:
    """Conv2d weight `[C_out, C_in/g, 1, k]` (kernel (1, k)) -> Conv1d weight `[C_out, C_in/g, k]`."""
    if t.dim() != 4 or t.shape[2] != 1:
        raise UsageError(f"expected a Conv2d weight of shape [C_out, C_in/g, 1, k], got {tuple(t.shape)}")
    return t.squeeze(2)


_L = r"model\.layers\.(\d+)\."
# The old -> new name table: (pattern on the authors' key, our key template, tensor transform or None).
RULES: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor] | None]] = [
    (r"model\.embeddings\.weight", "model.embeddings.weight", None),
    (r"model\.norm\.weight", "model.norm.weight", None),
    (r"lm_head\.weight", "lm_head.weight", None),
    (r"model\.(l1_lambda|num_kept)", r"model.\1", None),
    (_L + r"(attn_norm|mlp_norm)\.weight", r"model.layers.\1.\2.weight", None),
    (_L + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.weight", None),
    # GDN
    (_L + r"attn\.(A_log|dt_bias)", r"model.layers.\1.attn.\2", None),
    (_L + r"attn\.(a_proj|b_proj|g_proj)\.weight", r"model.layers.\1.attn.\2.weight", None),
    (_L + r"attn\.([qkv]_conv1d)\.weight", r"model.layers.\1.attn.\2.weight", None),
    (_L + r"attn\.o_norm\.weight", r"model.layers.\1.attn.o_norm.weight", None),
    # attention / NSA / LTE projections (and GDN's q/k/v/o)
    (_L + r"attn\.([qkvo]_proj)\.(weight|bias)", r"model.layers.\1.attn.\2.\3", None),
    # LTE router: Conv2d (1, k) -> Conv1d k
    (_L + r"attn\.router\.conv_stack\.(convs\.\d+|proj)\.weight", r"model.layers.\1.attn.router.conv_stack.\2.weight",
     _squeeze_conv2d),
    (_L + r"attn\.router\.conv_stack\.(convs\.\d+|proj)\.bias", r"model.layers.\1.attn.router.conv_stack.\2.bias",
     None),
]  # fmt: skip


def _rename(key: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    for pattern, template, transform in RULES:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template), transform
    raise UsageError(f"source key {key!r} matches no rule of hlsa.convert.RULES; the checkpoint is not convertible")


def expected_shapes(config_kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an hlsa model with this config, built on the meta device (no memory, no init cost)."""
    from hlsa.model import HybridForCausalLM

    with torch.device("meta"):
        model = HybridForCausalLM(HybridConfig(**config_kwargs))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config_kwargs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename and reshape the authors' tensors; strict (raises `ValueError` on any unmapped/missing/misshaped key).

    Works on meta tensors too (shape checks only). With tied embeddings the result has no `lm_head.weight`
    (transformers re-ties it at load); a source `lm_head.weight` that differs from the embeddings is an error.
    """
    want = expected_shapes(config_kwargs)
    tied = bool(config_kwargs.get("tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for key, tensor in state_dict.items():
        new, transform = _rename(key)
        value = transform(tensor) if transform is not None else tensor
        if new not in want:
            bad.append(f"{key} -> {new}: no such key in the hlsa model")
        elif tuple(value.shape) != want[new]:
            bad.append(f"{key} -> {new}: shape {tuple(value.shape)} != expected {want[new]}")
        elif new in out:
            bad.append(f"{key} -> {new}: two source keys map to the same target")
        else:
            out[new] = value
    missing = sorted(set(want) - set(out) - ({"lm_head.weight"} if tied else set()))
    bad += [f"{k}: missing from the source checkpoint" for k in missing]
    if bad:
        raise UsageError("checkpoint does not convert cleanly:\n  " + "\n  ".join(bad))
    if tied and "lm_head.weight" in out:
        head = out.pop("lm_head.weight")
        emb = out["model.embeddings.weight"]
        if not head.is_meta and not torch.equal(head, emb):
            raise UsageError("tie_word_embeddings is true but lm_head.weight differs from model.embeddings.weight")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not readable as JSON ({e})") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_source(src: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of a checkpoint directory: `config.json` plus `model.safetensors`,
    `pytorch_model.bin`, or their sharded `*.index.json` forms. Tensors are loaded without running any code
    (safetensors, or `torch.load(weights_only=True)`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    src = Path(src)
    if not src.is_dir():
        raise UsageError(f"SRC {src}: not a directory (pass the checkpoint directory)")
    if not (src / "config.json").exists():
        raise UsageError(f"SRC {src}: no config.json (pass a checkpoint directory)")
    cfg = _read_json(src / "config.json")
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(src):
        try:
            if f.suffix == ".safetensors":
                state.update(load_file(str(f)))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
            raise UsageError(f"{f}: not a readable weights file ({e})") from e
    return cfg, state


def _weight_files(src: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):  # fmt: skip
        if (src / single).exists():
            return [src / single]
        if (src / index).exists():
            return _shards(src, src / index)
    raise UsageError(f"SRC {src}: no model.safetensors or pytorch_model.bin (or their .index.json) found")


def _shards(src: Path, index: Path) -> list[Path]:
    """The shard files an index names, each of which must lie inside `src`."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise UsageError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file name")
    # Judged by the name, not by following links: a Hugging Face cache snapshot's files are links into blobs/.
    root, shards = Path(os.path.abspath(src)), []
    for name in sorted(set(weight_map.values())):
        path = Path(os.path.abspath(root / name))
        if root not in path.parents:
            raise UsageError(f"{index}: shard {name!r} lies outside the checkpoint directory; refusing to read it")
        if not path.exists():
            raise UsageError(f"{index}: shard {name!r} is missing")
        shards.append(path)
    return shards


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _check_destination(src: Path, dst: Path) -> None:
    """DST must be new (or an empty directory) and outside SRC: converting onto the source would overwrite the
    authors' checkpoint, and into a used directory would leave another model's files beside the new weights."""
    if dst.resolve() == src.resolve() or dst.resolve().is_relative_to(src.resolve()):
        raise UsageError(f"DST {dst} is the source directory or inside it; choose a new directory outside {src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"DST {dst} exists and is not an empty directory; choose a new one (nothing was written)")


def convert_checkpoint(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Convert directory `src` (authors' format) into the new directory `dst` (hlsa: config.json +
    model.safetensors, plus the source's tokenizer files). Returns the translated config kwargs.

    Everything is written into a temporary directory beside `dst`, renamed to `dst` only when complete: a failed
    conversion leaves nothing behind.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    _check_destination(src, dst)
    cfg, state = load_source(src)
    emb = state.get("model.embeddings.weight")
    try:
        kwargs = translate_config(cfg, vocab_size=None if emb is None else emb.shape[0])
    except ValueError as e:  # HybridConfig's own errors are ValueErrors; name the file the user must fix
        raise UsageError(f"{src / 'config.json'}: {e}") from e
    converted = convert_state_dict(state, kwargs)
    config = HybridConfig(**kwargs)
    config.architectures = ["HybridForCausalLM"]
    if emb is not None:
        config.dtype = emb.dtype  # `from_pretrained(dtype="auto")` then loads the weights as stored
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would differ from the user's other directories
    try:
        config.save_pretrained(tmp)
        tensors = {k: v.contiguous() for k, v in converted.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kwargs
