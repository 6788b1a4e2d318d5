"""`HybridConfig`: which mixer each layer uses, and each mixer kind's settings, validated once at construction.

A layer is one of

* `gdn`:  Gated DeltaNet (linear attention, constant-size recurrent state);
* `attn`: full causal softmax attention (growing KV cache);
* `swa`:  sliding-window attention (settings shared with `attn`; needs `attn.window_size`);
* `nsa`:  Native Sparse Attention (compressed + selected blocks + window);
* `lte`:  sliding window + sinks + a buffer of router-selected tokens (Learnable Token Eviction).

Window convention (docs/design.md): `window_size = W` lets a query see itself and the `W` tokens before it.
The config is never mutated after construction: every sub-config is copied, completed with defaults and checked here.
Checked: every field's type (no bool for an integer, no float for a size or an index), finiteness and range; rules
across fields (head divisibility, windows, the router's margin); and that no key is unknown, so a misspelt key is an
error rather than a default silently used (the keys transformers itself writes, `HF_CONFIG_KEYS`, are accepted).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import GenerationConfig, PretrainedConfig

from hlsa.ops import BACKENDS as OP_BACKENDS

MIXERS = ("gdn", "attn", "swa", "nsa", "lte")
# What a whole model can force, of the ops' backends: "auto" (each op its fastest) or "torch" (every op's PyTorch path).
# No kernel family covers every op, so "triton" and "fla" are per-op choices only.
BACKENDS = OP_BACKENDS[:2]

# A field check: `check(name, value)` raises `ValueError` naming the field when the value is of the wrong type or
# out of range. Cross-field rules (divisibility, window vs. margin, ...) live in `HybridConfig._validate`.
Check = Callable[[str, Any], None]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(lo: int, *, null: bool = False) -> Check:
    """An integer >= `lo` (bools and floats refused: `True` would silently be 1, `64.0` breaks tensor shapes)."""

    def check(name: str, value: Any) -> None:
        if (value is None and null) or (is_int(value) and value >= lo):
            return
        raise ValueError(f"{name} must be an integer >= {lo}{' or null' if null else ''} (got {value!r})")

    return check


def _real(
    *, gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None
) -> Check:
    """A finite number within the given bounds (NaN and infinities refused: they give NaN models, not errors)."""
    bounds = [f"{op} {b}" for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]

    def check(name: str, value: Any) -> None:
        if (
            _is_real(value)
            and (gt is None or value > gt)
            and (ge is None or value >= ge)
            and (lt is None or value < lt)
            and (le is None or value <= le)
        ):
            return
        raise ValueError(
            f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''} (got {value!r})"
        )

    return check


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false (got {value!r})")


def _one_of(*choices: str, note: str = "") -> Check:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            names = " or ".join(", ".join(repr(c) for c in choices).rsplit(", ", 1))
            raise ValueError(f"{name} must be {names} (got {value!r}){note}")

    return check


def _ints(lo: int) -> Check:
    """A non-empty list of integers >= `lo`."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, (list, tuple)) or not value or not all(is_int(v) and v >= lo for v in value):
            raise ValueError(f"{name} must be a non-empty list of integers >= {lo} (got {value!r})")

    return check


def _band(name: str, value: Any) -> None:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_real(v) for v in value)) or not (
        0 < value[0] <= value[1]
    ):
        raise ValueError(f"{name} must be [lo, hi] with 0 < lo <= hi, finite (got {value!r})")


def _field(default: Any, check: Check) -> Any:
    return dataclasses.field(default=default, metadata={"check": check})


# Typed settings of each mixer kind. Field names are the layer constructors' argument names, so a layer is built as
# `Layer(hidden_size=..., **asdict(settings))`. `None` defaults are derived from other fields when the config is
# built (noted beside each) or are required where a layer of that kind exists. In config.json each kind is one plain
# object (`gdn`, `attn`, `nsa`, `lte`), which `HybridConfig` stores as a dict; these classes are its typed views.
@dataclasses.dataclass(frozen=True)
class GDNConfig:
    """Settings of the Gated DeltaNet layers (`hlsa.layers.gdn.GatedDeltaNet`)."""

    num_heads: int | None = _field(None, _int(1, null=True))  # required when a gdn layer exists
    head_dim: int | None = _field(None, _int(1, null=True))  # default: hidden_size // num_heads
    expand_v: float = _field(1.0, _real(gt=0))
    use_short_conv: bool = _field(True, _flag)
    conv_size: int = _field(4, _int(1))
    use_gate: bool = _field(True, _flag)


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Settings of the full (`attn`) and sliding-window (`swa`) attention layers (`hlsa.layers.attention`)."""

    num_heads: int | None = _field(None, _int(1, null=True))
    num_kv_heads: int | None = _field(None, _int(1, null=True))  # default: num_heads
    head_dim: int | None = _field(None, _int(1, null=True))  # default: hidden_size // num_heads
    window_size: int | None = _field(None, _int(1, null=True))  # required for swa layers; attn layers have none
    qkv_bias: bool = _field(False, _flag)
    rope_theta: float = _field(10000.0, _real(gt=0))


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Settings of the Native Sparse Attention layers (`hlsa.layers.nsa`)."""

    num_heads: int | None = _field(None, _int(1, null=True))
    num_kv_heads: int | None = _field(None, _int(1, null=True))
    head_dim: int | None = _field(64, _int(1, null=True))
    block_size: int = _field(64, _int(1))
    block_counts: int = _field(16, _int(1))
    window_size: int | None = _field(511, _int(1, null=True))  # the authors' 512-token window in our convention
    qkv_bias: bool = _field(False, _flag)
    rope_theta: float = _field(10000.0, _real(gt=0))


@dataclasses.dataclass(frozen=True)
class LTEConfig:
    """Settings of the LTE layers (`hlsa.layers.lte.LTEAttention`): what the model is."""

    num_heads: int | None = _field(None, _int(1, null=True))
    num_kv_heads: int | None = _field(None, _int(1, null=True))
    head_dim: int | None = _field(None, _int(1, null=True))
    window_size: int | None = _field(768, _int(1, null=True))
    buffer_size: int = _field(512, _int(0))
    sink_size: int = _field(4, _int(0))
    conv_size: tuple[int, ...] = _field((3, 3, 3), _ints(1))
    conv_dilation: tuple[int, ...] = _field((2, 2, 2), _ints(1))
    dropout_prob: float = _field(0.1, _real(ge=0, lt=1))
    routing_method: str = _field("sigmoid", _one_of("sigmoid", "relu"))
    routing_grad: bool = _field(True, _flag)
    routing_shared: str = _field(
        "head", _one_of("head", "layer", note="; the authors' 'all' (one CNN shared by every layer) is not supported")
    )
    # the authors' 0.5: every score starts positive (every token kept); < 0 starts as SWA
    router_bias_init: float = _field(0.5, _real())
    # Which older tokens a query sees in training: "positive" (the authors': every positively scored token, no
    # cap) or "buffer" (the inference rule: the top `buffer_size` positive scores older than its window)
    train_selection: str = _field("positive", _one_of("positive", "buffer"))
    # Ours (false: the authors' gradient). True removes, per row and head, the mean of the value-gain gradient over
    # positions, so the router learns which tokens matter more than others while leaving how many are kept to the
    # controller (the mean is a preference for a smaller or larger value gain on every token alike).
    router_grad_centered: bool = _field(False, _flag)
    qkv_bias: bool = _field(False, _flag)
    rope_theta: float = _field(10000.0, _real(gt=0))


@dataclasses.dataclass(frozen=True)
class LTEControllerConfig:
    """How training drives the LTE routers (`hlsa.train.controller`): the L1 sparsity controller and its schedules.
    The model never reads these; they are stored in the `lte` section beside the layer settings, as the authors do."""

    routing_freeze_steps: int = _field(0, _int(0))
    l1_lambda_init: float = _field(1e-9, _real(ge=0))
    l1_lambda_min: float = _field(1e-9, _real(ge=0))
    l1_lambda_max: float = _field(1.0, _real(ge=0))  # 0 turns the L1 term off
    # lambda *= l1_alpha when too many tokens are kept and /= l1_alpha_neg when too few: a factor below 1 would
    # steer the wrong way
    l1_alpha: float = _field(1.5, _real(ge=1))
    l1_alpha_neg: float = _field(2.0, _real(ge=1))
    l1_warmup_steps: int = _field(0, _int(0))
    l1_lambda_initial_steps: int = _field(0, _int(0))
    l1_lambda_update_steps: int = _field(32, _int(1))
    l1_lambda_shared: str = _field("head", _one_of("head", "layer", "all"))
    l1_lambda_tolerate: tuple[float, float] = _field((0.95, 1.0), _band)
    # Ours (false: the authors' controller). True lets lambda turn negative when a head keeps too few tokens: the
    # term then rewards every score, pulling the head's threshold back, where the authors' term can only push down
    # (a head whose scores are all negative gets no gradient that asks it to keep a token again).
    l1_lambda_signed: bool = _field(False, _flag)
    # Ours (0: off; at most 1). After every optimizer step, move each head's selection threshold (its router's
    # output bias, which the optimiser then leaves alone) `threshold_step` of the way to the logit at which the
    # step's batch kept `buffer_size` tokens per row: the count follows N at once, whatever the scale of the logits
    # and without the optimiser's momentum, as a loss term cannot. Sigmoid routing only.
    threshold_step: float = _field(0.0, _real(ge=0, le=1))

    def __post_init__(self) -> None:
        if self.l1_lambda_min > self.l1_lambda_max:
            raise ValueError(
                f"lte.l1_lambda_min ({self.l1_lambda_min}) must be <= lte.l1_lambda_max ({self.l1_lambda_max})"
            )

    @classmethod
    def from_section(cls, lte: Mapping[str, Any]) -> LTEControllerConfig:
        """The settings from an `lte` section, every field checked as `HybridConfig` checks it (`ValueError`)."""
        return _view(cls, complete_section("lte", lte))


# The classes stored in each section of config.json.
SECTIONS: dict[str, tuple[type, ...]] = {
    "gdn": (GDNConfig,),
    "attn": (AttnConfig,),
    "nsa": (NSAConfig,),
    "lte": (LTEConfig, LTEControllerConfig),
}
# Each section's fields: name -> (default, check).
FIELDS: dict[str, dict[str, tuple[Any, Check]]] = {
    section: {f.name: (f.default, f.metadata["check"]) for cls in classes for f in dataclasses.fields(cls)}
    for section, classes in SECTIONS.items()
}
GDN_DEFAULTS, ATTN_DEFAULTS, NSA_DEFAULTS, LTE_DEFAULTS = (
    {k: default for k, (default, _) in fields.items()} for fields in FIELDS.values()
)
# Top-level numeric and flag fields; the rest (mixers, sub-configs, backend, hidden_act) are checked by hand.
TOP_FIELDS: dict[str, Check] = {
    "vocab_size": _int(1),
    "hidden_size": _int(1),
    "num_hidden_layers": _int(1),
    "intermediate_size": _int(1, null=True),  # null: derived from hidden_ratio
    "hidden_ratio": _real(gt=0),
    "norm_eps": _real(gt=0),
    "initializer_range": _real(gt=0),
    "max_position_embeddings": _int(1),
    "tie_word_embeddings": _flag,
    "use_cache": _flag,
    "bos_token_id": _int(0, null=True),
    "eos_token_id": _int(0, null=True),
    "pad_token_id": _int(0, null=True),
}
# Keys transformers' own config accepts beside a model's fields: its dataclass fields, the generation parameters it
# drops on load, and the names `from_dict`/`to_dict`/`__post_init__` read or write that are not fields. A config.json
# written by transformers may carry any of them; every other unknown key is a typo or another model's setting.
HF_CONFIG_KEYS = frozenset(
    {f.name for f in dataclasses.fields(PretrainedConfig)}
    | set(GenerationConfig._get_default_generation_params())
    | {"model_type", "_name_or_path", "name_or_path", "torch_dtype", "num_labels", "output_attentions",
       "attn_implementation", "experts_implementation", "_commit_hash", "auto_map",
       # written by transformers 4.x, still accepted (and stored) by 5.x
       "_attn_implementation_autoset", "tokenizer_class", "prefix", "finetuning_task", "task_specific_params",
       "sep_token_id", "decoder_start_token_id", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
       "cross_attention_hidden_size", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss"}
)  # fmt: skip
# Which sub-config a layer kind reads.
SUBCONFIG_OF = {"gdn": "gdn", "attn": "attn", "swa": "attn", "nsa": "nsa", "lte": "lte"}


def complete_section(name: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Section `name` as stored: a fresh dict with defaults filled in and every field's type and range checked."""
    fields = FIELDS[name]
    if given is not None and not isinstance(given, Mapping):
        raise ValueError(f"{name} must be a mapping of field -> value (got {type(given).__name__})")
    given = dict(given or {})
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {unknown}; allowed fields are {sorted(fields)}")
    # Sequences are stored as fresh lists, as JSON has them: no config shares a list with another or its caller.
    out = {k: given.get(k, default) for k, (default, _) in fields.items()}
    out = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in out.items()}
    for key, (_, check) in fields.items():
        check(f"{name}.{key}", out[key])
    return out


def _mixers_from(num_hidden_layers: int, mixer_layers: Mapping[str, Sequence[int]]) -> list[str]:
    """`{"lte": [1, 3]}` -> one mixer per layer, `gdn` where no other mixer is named."""
    types = ["gdn"] * num_hidden_layers
    owner: dict[int, str] = {}
    if not isinstance(mixer_layers, Mapping):
        raise ValueError(f"mixer_layers must map a mixer to a list of layer indices (got {mixer_layers!r})")
    for mixer, layers in mixer_layers.items():
        if mixer not in MIXERS:
            raise ValueError(f"mixer_layers: unknown mixer {mixer!r}; expected one of {MIXERS}")
        if not isinstance(layers, (list, tuple)) or not all(is_int(i) for i in layers):
            raise ValueError(f"mixer_layers[{mixer!r}] must be a list of integer layer indices (got {layers!r})")
        for i in layers:
            if not 0 <= i < num_hidden_layers:
                raise ValueError(
                    f"mixer_layers[{mixer!r}]: layer index {i} is out of range for num_hidden_layers="
                    f"{num_hidden_layers} (valid: 0..{num_hidden_layers - 1})"
                )
            if i in owner:
                raise ValueError(f"mixer_layers: layer {i} is assigned to both {owner[i]!r} and {mixer!r}")
            owner[i] = mixer
            types[i] = mixer
    return types


def _unknown_keys_message(unknown: list[str]) -> str:
    own = [p for p in inspect.signature(HybridConfig.__init__).parameters if p not in ("self", "kwargs")]
    hints = [f"{k!r} -> {m[0]!r}" for k in unknown if (m := difflib.get_close_matches(k, own, n=1))]
    return (
        f"unknown config key(s) {unknown}: neither a HybridConfig field ({', '.join(own)}) nor one of transformers' "
        "own; fix or remove them" + (f" (did you mean {', '.join(hints)}?)" if hints else "")
    )


class HybridConfig(PretrainedConfig):
    """Configuration of a hybrid GDN + sparse attention language model.

    Give the per-layer mixers either as `mixers` (a list of `gdn|attn|swa|nsa|lte`, one per layer) or as
    `mixer_layers` (e.g. `{"lte": [1, 3, 5]}`; unnamed layers are `gdn`). Sections `gdn`, `attn`, `nsa`, `lte`
    are stored as dicts, as in config.json; their fields and defaults are those of `GDNConfig`, `AttnConfig`,
    `NSAConfig`, and `LTEConfig` + `LTEControllerConfig` above, and `mixer_config(kind)` / `lte_controller` give
    them typed and frozen.
    """

    model_type = "hlsa"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        mixers: Sequence[str] | None = None,
        mixer_layers: Mapping[str, Sequence[int]] | None = None,
        gdn: Mapping[str, Any] | None = None,
        attn: Mapping[str, Any] | None = None,
        nsa: Mapping[str, Any] | None = None,
        lte: Mapping[str, Any] | None = None,
        intermediate_size: int | None = None,
        hidden_ratio: float = 4,
        hidden_act: str = "swish",
        norm_eps: float = 1e-6,
        initializer_range: float = 0.006,
        max_position_embeddings: int = 4096,
        tie_word_embeddings: bool = True,
        backend: str = "auto",
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - HF_CONFIG_KEYS)
        if unknown:
            raise ValueError(_unknown_keys_message(unknown))
        if mixers is not None and mixer_layers is not None:
            raise ValueError("give either mixers or mixer_layers, not both")
        if mixers is not None and not isinstance(mixers, (list, tuple)):
            raise ValueError(f"mixers must be a list with one mixer name per layer (got {mixers!r})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.hidden_ratio = hidden_ratio
        self.hidden_act = hidden_act
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.backend = backend
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Types and ranges first: the derivations below compute with these values.
        for name, check in TOP_FIELDS.items():
            check(name, getattr(self, name))
        if self.intermediate_size is None:
            # SwiGLU width 2/3 * ratio * d, rounded up to a multiple of 256 (2816 at d=1024, 5632 at d=2048).
            self.intermediate_size = 256 * math.ceil(hidden_size * hidden_ratio * 2 / 3 / 256)
        self.mixers = list(mixers) if mixers is not None else _mixers_from(num_hidden_layers, mixer_layers or {})
        self.gdn = complete_section("gdn", gdn)
        self.attn = complete_section("attn", attn)
        self.nsa = complete_section("nsa", nsa)
        self.lte = complete_section("lte", lte)
        self._validate()
        self._fill_derived()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> HybridConfig:
        """As `PretrainedConfig.from_dict`, but overrides of our own fields (`from_pretrained(path, hidden_size=...)`)
        go through `__init__`: transformers would set them after construction, past every check."""
        own = inspect.signature(cls.__init__).parameters
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in own and k != "kwargs"}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    def _fill_derived(self) -> None:
        """Resolve `None` defaults that depend on other fields, so every consumer reads one final value."""
        for kind in ("gdn", "attn", "lte", "nsa"):
            sub = getattr(self, kind)
            if sub["num_heads"] is None:
                continue
            if sub.get("head_dim") is None:
                sub["head_dim"] = self.hidden_size // sub["num_heads"]
            if "num_kv_heads" in sub and sub["num_kv_heads"] is None:
                sub["num_kv_heads"] = sub["num_heads"]

    def _validate(self) -> None:
        """Rules across fields; each field's own type and range was checked by `TOP_FIELDS` / `_complete`."""
        if len(self.mixers) != self.num_hidden_layers:
            raise ValueError(f"mixers has {len(self.mixers)} entries but num_hidden_layers={self.num_hidden_layers}")
        for i, t in enumerate(self.mixers):
            if t not in MIXERS:
                raise ValueError(f"mixers[{i}]: unknown mixer {t!r}; expected one of {MIXERS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {BACKENDS}")
        if self.hidden_act not in ("swish", "silu"):
            raise ValueError(f"hidden_act must be 'swish' (SiLU, the gated MLP's activation); got {self.hidden_act!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token = getattr(self, name)
            if token is not None and token >= self.vocab_size:
                raise ValueError(f"{name} ({token}) must be < vocab_size ({self.vocab_size}): it indexes the embedding")
        _view(LTEControllerConfig, self.lte)  # its __post_init__ checks l1_lambda_min <= l1_lambda_max
        used = {SUBCONFIG_OF[t] for t in self.mixers}
        for kind in sorted(used):
            self._validate_heads(kind)
        if "gdn" in used:
            self._validate_gdn()
        if "swa" in self.mixers and self.attn["window_size"] is None:
            raise ValueError("attn.window_size is required for swa layers (a query sees itself + W tokens)")
        if "attn" in self.mixers and self.attn["window_size"] is not None and "swa" not in self.mixers:
            raise ValueError(
                "attn.window_size is set but no layer is 'swa'; use layer type 'swa' for sliding-window layers"
            )
        if "nsa" in used:
            self._validate_nsa()
        if "lte" in used:
            self._validate_lte()

    def _validate_heads(self, kind: str) -> None:
        sub = getattr(self, kind)
        heads, kv = sub["num_heads"], sub.get("num_kv_heads")
        if heads is None:
            raise ValueError(f"{kind}.num_heads is required: the config has {kind} layers")
        if kv is not None and heads % kv != 0:
            raise ValueError(
                f"{kind}.num_heads ({heads}) must be divisible by {kind}.num_kv_heads ({kv}): each kv head serves "
                "a whole group of query heads (GQA)"
            )
        if sub.get("head_dim") is None and self.hidden_size % heads != 0:
            raise ValueError(
                f"{kind}.head_dim is not given and hidden_size ({self.hidden_size}) is not divisible by "
                f"{kind}.num_heads ({heads}); set {kind}.head_dim"
            )
        if kind != "gdn" and self._head_dim(kind) % 2 != 0:
            raise ValueError(f"{kind}.head_dim must be even for rotary embeddings")

    def _head_dim(self, kind: str) -> int:
        sub = getattr(self, kind)
        return sub["head_dim"] if sub.get("head_dim") is not None else self.hidden_size // sub["num_heads"]

    def _validate_gdn(self) -> None:
        head_v_dim = self._head_dim("gdn") * self.gdn["expand_v"]
        if head_v_dim != int(head_v_dim):
            raise ValueError(f"gdn.expand_v * head_dim must be a positive integer (got {head_v_dim})")

    def _validate_nsa(self) -> None:
        nsa = self.nsa
        if nsa["window_size"] is None:
            raise ValueError("nsa.window_size is required for nsa layers (its sliding branch sees itself + W tokens)")
        # The selected blocks must fit in the context the model is built for; otherwise top-S is always "all".
        if nsa["block_size"] * nsa["block_counts"] > self.max_position_embeddings:
            raise ValueError(
                f"nsa.block_size * nsa.block_counts ({nsa['block_size']} * {nsa['block_counts']}) exceeds "
                f"max_position_embeddings ({self.max_position_embeddings}): the selected blocks cannot be held; "
                "lower nsa.block_counts or nsa.block_size"
            )

    def _validate_lte(self) -> None:
        lte = self.lte
        if lte["window_size"] is None:
            raise ValueError("lte.window_size is required for lte layers (a query sees itself + W tokens)")
        if lte["buffer_size"] < lte["sink_size"]:
            raise ValueError(
                f"lte.buffer_size ({lte['buffer_size']}) must be >= lte.sink_size ({lte['sink_size']}): sinks are "
                "kept inside the retained buffer"
            )
        if len(lte["conv_size"]) != len(lte["conv_dilation"]):
            raise ValueError("lte.conv_size and lte.conv_dilation must have the same length (one dilation per conv)")
        if any(k % 2 == 0 for k in lte["conv_size"]):
            raise ValueError("lte.conv_size entries must be odd (symmetric padding)")
        head_dim = self._head_dim("lte")
        if (2 * head_dim) % (2 ** len(lte["conv_size"])) != 0:
            raise ValueError(
                f"lte: each router conv halves the channels (2 * head_dim = {2 * head_dim}); head_dim must be "
                f"divisible by 2**{len(lte['conv_size']) - 1}"
            )
        margin = self.lte_margin
        if lte["window_size"] < margin:
            raise ValueError(
                f"lte.window_size ({lte['window_size']}) must be >= the router's receptive margin ({margin}): a "
                "token's score reads its next `margin` tokens, and a query must not use a score that depends on "
                "tokens after itself"
            )
        if lte["routing_method"] == "relu" and not lte["router_bias_init"] > 0:
            raise ValueError(
                f"lte.router_bias_init must be > 0 with routing_method 'relu' (got {lte['router_bias_init']}): a "
                "relu score starts at 0 for every token and its gradient is 0 there, so the router would never learn"
            )

    # ----------------------------------------------------------------------------------------------------------------
    def mixer_config(self, kind: str) -> GDNConfig | AttnConfig | NSAConfig | LTEConfig:
        """The typed, frozen settings of layer kind `kind` (one of `MIXERS`), read from its section: `swa` layers
        read `attn` with its window, full `attn` layers the same without one."""
        section = SUBCONFIG_OF[kind]
        settings = _view(SECTIONS[section][0], getattr(self, section))
        return dataclasses.replace(settings, window_size=None) if kind == "attn" else settings

    @property
    def lte_controller(self) -> LTEControllerConfig:
        """The typed, frozen settings of the L1 sparsity controller (stored in the `lte` section)."""
        return _view(LTEControllerConfig, self.lte)

    @property
    def lte_receptive_field(self) -> int:
        return 1 + sum((k - 1) * d for k, d in zip(self.lte["conv_size"], self.lte["conv_dilation"]))

    @property
    def lte_margin(self) -> int:
        """How many neighbours on each side a router score reads (6 for the authors' 3 x (k=3, d=2))."""
        return self.lte_receptive_field // 2

    @property
    def lte_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.mixers) if t == "lte"]


def _view(cls: type[Any], section: Mapping[str, Any]) -> Any:
    """An instance of dataclass `cls` from the stored section (lists become tuples: the view is immutable)."""
    return cls(**{f.name: (tuple(v) if isinstance(v := section[f.name], list) else v) for f in dataclasses.fields(cls)})
