"""`HybridConfig`: which mixer each layer uses, and each mixer kind's settings, validated once at construction.

A layer is one of

* `gdn`:  Gated DeltaNet (linear attention, constant-size recurrent state);
* `attn`: full causal softmax attention (growing KV cache);
* `swa`:  sliding-window attention (settings shared with `attn`; needs `attn.window_size`);
* `nsa`:  Native Sparse Attention (compressed + selected blocks + window);
* `lte`:  sliding window + sinks + a buffer of router-selected tokens (Learnable Token Eviction).

Window convention (docs/design.md): `window_size = W` lets a query see itself and the `W` tokens before it.
The config is never mutated after construction: every sub-config is copied, completed with defaults and checked here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PretrainedConfig

MIXERS = ("gdn", "attn", "swa", "nsa", "lte")
BACKENDS = ("auto", "torch")

# Defaults of each mixer kind; `None` means "derived from other fields" (documented at the use site).
GDN_DEFAULTS: dict[str, Any] = {
    "num_heads": None,  # required when a gdn layer exists
    "head_dim": None,  # default: hidden_size // num_heads
    "expand_v": 1.0,
    "use_short_conv": True,
    "conv_size": 4,
    "use_gate": True,
}
ATTN_DEFAULTS: dict[str, Any] = {
    "num_heads": None,
    "num_kv_heads": None,  # default: num_heads
    "head_dim": None,  # default: hidden_size // num_heads
    "qkv_bias": False,
    "window_size": None,  # required for swa layers
    "rope_theta": 10000.0,
}
NSA_DEFAULTS: dict[str, Any] = {
    "num_heads": None,
    "num_kv_heads": None,
    "head_dim": 64,
    "block_size": 64,
    "block_counts": 16,
    "qkv_bias": False,
    "window_size": 511,  # the authors' 512-token window in our convention
    "rope_theta": 10000.0,
}
LTE_DEFAULTS: dict[str, Any] = {
    "num_heads": None,
    "num_kv_heads": None,
    "head_dim": None,
    "qkv_bias": False,
    "window_size": 768,
    "buffer_size": 512,
    "sink_size": 4,
    "rope_theta": 10000.0,
    "conv_size": [3, 3, 3],
    "conv_dilation": [2, 2, 2],
    "dropout_prob": 0.1,
    "routing_method": "sigmoid",
    "routing_grad": True,
    "routing_shared": "head",
    "router_bias_init": 0.5,  # the authors': every score starts positive (every token kept); < 0 starts as SWA
    # Which older tokens a query sees in training: "positive" (the authors': every positively scored token, no
    # cap) or "buffer" (the inference rule: the top `buffer_size` positive scores older than its window)
    "train_selection": "positive",
    "routing_freeze_steps": 0,
    "l1_lambda_init": 1e-9,
    "l1_lambda_min": 1e-9,
    "l1_lambda_max": 1.0,
    "l1_alpha": 1.5,
    "l1_alpha_neg": 2.0,
    "l1_warmup_steps": 0,
    "l1_lambda_initial_steps": 0,
    "l1_lambda_update_steps": 32,
    "l1_lambda_shared": "head",
    "l1_lambda_tolerate": [0.95, 1.0],
}
# Which sub-config a layer kind reads.
SUBCONFIG_OF = {"gdn": "gdn", "attn": "attn", "swa": "attn", "nsa": "nsa", "lte": "lte"}


def _complete(name: str, given: Mapping[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {unknown}; allowed fields are {sorted(defaults)}")
    return {**defaults, **given}


def _mixers_from(num_hidden_layers: int, mixer_layers: Mapping[str, Sequence[int]]) -> list[str]:
    """`{"lte": [1, 3]}` -> one mixer per layer, `gdn` where no other mixer is named."""
    types = ["gdn"] * num_hidden_layers
    owner: dict[int, str] = {}
    for mixer, layers in mixer_layers.items():
        if mixer not in MIXERS:
            raise ValueError(f"mixer_layers: unknown mixer {mixer!r}; expected one of {MIXERS}")
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


class HybridConfig(PretrainedConfig):
    """Configuration of a hybrid GDN + sparse attention language model.

    Give the per-layer mixers either as `mixers` (a list of `gdn|attn|swa|nsa|lte`, one per layer) or as
    `mixer_layers` (e.g. `{"lte": [1, 3, 5]}`; unnamed layers are `gdn`). Sub-configs `gdn`, `attn`, `nsa`, `lte`
    are dicts whose fields and defaults are listed at the top of this module.
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
        if mixers is not None and mixer_layers is not None:
            raise ValueError("give either mixers or mixer_layers, not both")
        if mixers is None:
            mixers = _mixers_from(num_hidden_layers, mixer_layers or {})
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.mixers = list(mixers)
        self.gdn = _complete("gdn", gdn, GDN_DEFAULTS)
        self.attn = _complete("attn", attn, ATTN_DEFAULTS)
        self.nsa = _complete("nsa", nsa, NSA_DEFAULTS)
        self.lte = _complete("lte", lte, LTE_DEFAULTS)
        if intermediate_size is None:
            # SwiGLU width 2/3 * ratio * d, rounded up to a multiple of 256 (2816 at d=1024, 5632 at d=2048).
            intermediate_size = 256 * math.ceil(hidden_size * hidden_ratio * 2 / 3 / 256)
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
        self._validate()
        self._fill_derived()

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
        if self.vocab_size < 1 or self.hidden_size < 1 or self.num_hidden_layers < 1:
            raise ValueError("vocab_size, hidden_size and num_hidden_layers must be positive")
        if len(self.mixers) != self.num_hidden_layers:
            raise ValueError(f"mixers has {len(self.mixers)} entries but num_hidden_layers={self.num_hidden_layers}")
        for i, t in enumerate(self.mixers):
            if t not in MIXERS:
                raise ValueError(f"mixers[{i}]: unknown mixer {t!r}; expected one of {MIXERS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {BACKENDS}")
        if self.hidden_act not in ("swish", "silu"):
            raise ValueError(f"hidden_act must be 'swish' (SiLU, the gated MLP's activation); got {self.hidden_act!r}")
        used = {SUBCONFIG_OF[t] for t in self.mixers}
        for kind in sorted(used):
            self._validate_heads(kind)
        if "gdn" in used:
            self._validate_gdn()
        if "swa" in self.mixers:
            self._validate_window("attn", required=True)
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
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"{kind}.num_heads must be a positive integer (got {heads!r})")
        if kv is not None and (not isinstance(kv, int) or kv < 1 or heads % kv != 0):
            raise ValueError(
                f"{kind}.num_heads ({heads}) must be divisible by {kind}.num_kv_heads ({kv}): each kv head serves "
                "a whole group of query heads (GQA)"
            )
        head_dim = sub.get("head_dim")
        if head_dim is None and self.hidden_size % heads != 0:
            raise ValueError(
                f"{kind}.head_dim is not given and hidden_size ({self.hidden_size}) is not divisible by "
                f"{kind}.num_heads ({heads}); set {kind}.head_dim"
            )
        if head_dim is not None and (not _is_int(head_dim) or head_dim < 1):
            raise ValueError(f"{kind}.head_dim must be a positive integer or null (hidden_size // num_heads)")
        if kind != "gdn" and self._head_dim(kind) % 2 != 0:
            raise ValueError(f"{kind}.head_dim must be even for rotary embeddings")

    def _head_dim(self, kind: str) -> int:
        sub = getattr(self, kind)
        return sub["head_dim"] if sub.get("head_dim") is not None else self.hidden_size // sub["num_heads"]

    def _validate_gdn(self) -> None:
        gdn = self.gdn
        expand_v = gdn["expand_v"]
        head_v_dim = self._head_dim("gdn") * expand_v if isinstance(expand_v, (int, float)) else None
        if head_v_dim is None or expand_v <= 0 or head_v_dim != int(head_v_dim):
            raise ValueError(f"gdn.expand_v * head_dim must be a positive integer (got {expand_v!r} * head_dim)")
        if gdn["use_short_conv"] and (not _is_int(gdn["conv_size"]) or gdn["conv_size"] < 1):
            raise ValueError(f"gdn.conv_size must be an integer >= 1 with use_short_conv (got {gdn['conv_size']!r})")

    def _validate_window(self, kind: str, *, required: bool) -> None:
        w = getattr(self, kind)["window_size"]
        if w is None and required:
            raise ValueError(f"{kind}.window_size is required for this layer type (a query sees itself + W tokens)")
        if w is not None and (not isinstance(w, int) or w < 1):
            raise ValueError(f"{kind}.window_size must be an integer >= 1 (got {w!r})")

    def _validate_nsa(self) -> None:
        nsa = self.nsa
        self._validate_window("nsa", required=True)
        if not isinstance(nsa["block_size"], int) or nsa["block_size"] < 1:
            raise ValueError(f"nsa.block_size must be a positive integer (got {nsa['block_size']!r})")
        if not isinstance(nsa["block_counts"], int) or nsa["block_counts"] < 1:
            raise ValueError(f"nsa.block_counts must be a positive integer (got {nsa['block_counts']!r})")
        # The selected blocks must fit in the context the model is built for; otherwise top-S is always "all".
        if nsa["block_size"] * nsa["block_counts"] > self.max_position_embeddings:
            raise ValueError(
                f"nsa.block_size * nsa.block_counts ({nsa['block_size']} * {nsa['block_counts']}) exceeds "
                f"max_position_embeddings ({self.max_position_embeddings}): the selected blocks cannot be held; "
                "lower nsa.block_counts or nsa.block_size"
            )

    def _validate_lte(self) -> None:
        lte = self.lte
        self._validate_window("lte", required=True)
        if not isinstance(lte["buffer_size"], int) or not isinstance(lte["sink_size"], int) or lte["sink_size"] < 0:
            raise ValueError("lte.buffer_size and lte.sink_size must be non-negative integers")
        if lte["buffer_size"] < lte["sink_size"]:
            raise ValueError(
                f"lte.buffer_size ({lte['buffer_size']}) must be >= lte.sink_size ({lte['sink_size']}): sinks are "
                "kept inside the retained buffer"
            )
        if len(lte["conv_size"]) != len(lte["conv_dilation"]) or not lte["conv_size"]:
            raise ValueError("lte.conv_size and lte.conv_dilation must be non-empty lists of the same length")
        if not all(_is_int(v) for v in (*lte["conv_size"], *lte["conv_dilation"])):
            raise ValueError("lte.conv_size and lte.conv_dilation entries must be integers")
        if any(k < 1 or k % 2 == 0 for k in lte["conv_size"]) or any(d < 1 for d in lte["conv_dilation"]):
            raise ValueError("lte.conv_size entries must be odd and >= 1 (symmetric padding); dilations >= 1")
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
        if lte["routing_method"] not in ("sigmoid", "relu"):
            raise ValueError(f"lte.routing_method must be 'sigmoid' or 'relu' (got {lte['routing_method']!r})")
        if lte["routing_shared"] not in ("head", "layer"):
            raise ValueError(
                f"lte.routing_shared must be 'head' or 'layer' (got {lte['routing_shared']!r}); the authors' 'all' "
                "(one CNN shared by every layer) is not supported"
            )
        if lte["l1_lambda_shared"] not in ("head", "layer", "all"):
            raise ValueError(f"lte.l1_lambda_shared must be 'head', 'layer' or 'all' (got {lte['l1_lambda_shared']!r})")
        if lte["routing_method"] == "relu" and not lte["router_bias_init"] > 0:
            raise ValueError(
                f"lte.router_bias_init must be > 0 with routing_method 'relu' (got {lte['router_bias_init']}): a "
                "relu score starts at 0 for every token and its gradient is 0 there, so the router would never learn"
            )
        if lte["train_selection"] not in ("positive", "buffer"):
            raise ValueError(f"lte.train_selection must be 'positive' or 'buffer' (got {lte['train_selection']!r})")
        if not 0.0 <= lte["dropout_prob"] < 1.0:
            raise ValueError(f"lte.dropout_prob must be in [0, 1) (got {lte['dropout_prob']})")

    # ----------------------------------------------------------------------------------------------------------------
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
