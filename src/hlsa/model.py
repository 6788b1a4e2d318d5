"""The hybrid language model, top to bottom: mixer choice, block, model, causal LM.

A block is pre-norm: `x += mixer(norm(x))`, `x += mlp(norm(x))`. The mixer of each layer comes from
`config.mixers` (GDN, full attention, SWA, NSA or LTE). Single-device code: data/fully-sharded parallelism is
applied from outside (hlsa.train).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from hlsa.cache import HybridCache
from hlsa.config import HybridConfig
from hlsa.layers.attention import Attention
from hlsa.layers.eviction import Eviction
from hlsa.layers.gdn import GatedDeltaNet
from hlsa.layers.linear import Linear
from hlsa.layers.lte import LTEAttention, LTERouting
from hlsa.layers.lte_router import LTERouter
from hlsa.layers.mlp import GatedMLP
from hlsa.layers.norm import RMSNorm
from hlsa.layers.nsa import NativeSparseAttention

# The layer class of each mixer kind; its arguments are the fields of `config.mixer_config(kind)`.
MIXER_LAYERS: dict[str, type[nn.Module]] = {
    "gdn": GatedDeltaNet,
    "attn": Attention,
    "swa": Attention,
    "nsa": NativeSparseAttention,
    "lte": LTEAttention,
}


def build_mixer(config: HybridConfig, kind: str) -> nn.Module:
    """One token mixer of type `kind` with the settings of its sub-config."""
    settings = asdict(config.mixer_config(kind))
    if kind == "gdn":
        settings["norm_eps"] = config.norm_eps  # GDN's output norm uses the model's epsilon
    return MIXER_LAYERS[kind](hidden_size=config.hidden_size, **settings, backend=config.backend)


class Block(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.mixers[layer_idx]
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = build_mixer(config, self.kind)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, hidden_act=config.hidden_act, backend=config.backend
        )

    def forward(
        self, x: torch.Tensor, *, pad_mask: torch.Tensor | None, state: object | None
    ) -> tuple[torch.Tensor, LTERouting | None]:
        if pad_mask is not None:
            # Pads carry zeros through every layer: a zero input keeps GDN states and conv windows at "sequence start".
            x = x * pad_mask[:, :, None].to(x.dtype)
        h, routing = self.attn(self.attn_norm(x), pad_mask=pad_mask, state=state)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), routing


@dataclass
class HybridOutput(ModelOutput):
    """`routing`: one `LTERouting(score, selected)` per LTE layer (layer order), or None without LTE layers.

    transformers' `ModelOutput` also answers `past_key_values` with the cache (its older name).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: HybridCache | None = None
    routing: tuple[LTERouting, ...] | None = None


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _is_stateful = True  # recurrent/evicting caches cannot be rolled back (no assisted decoding)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers skips modules without parameters of their own when the model is not part of transformers;
        # ours must still run there (the router's and the residual-projection inits live on param-less parents).
        # Every write below is guarded against tensors loaded from a checkpoint.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The authors' initialisation: Linear/Conv1d/Embedding ~ N(0, initializer_range); output projections
        rescaled by the depth.

        Modules are visited children first, so the router's and GDN's own inits (run on the parent) win over the
        generic Linear/Conv1d rule applied to their children.
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LTERouter):
            module.reset_parameters()
        elif isinstance(module, GatedDeltaNet) and not getattr(module.A_log, "_is_hf_initialized", False):
            module.reset_decay_parameters()
        elif isinstance(module, HybridModel):
            for buf in (module.l1_lambda, module.num_kept):
                if buf is not None:
                    nn.init.zeros_(buf)
        # Residual branches: kaiming-uniform then / sqrt(2 * layers) ("rescale" prenorm strategy, fla).
        out = getattr(module, "o_proj", None) if not isinstance(module, GatedMLP) else module.down_proj
        if isinstance(out, nn.Linear) and not getattr(out.weight, "_is_hf_initialized", False):
            nn.init.kaiming_uniform_(out.weight, a=math.sqrt(5))
            out.weight.div_(math.sqrt(2 * self.config.num_hidden_layers))


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        # The sparsity controller's state (docs/design.md, "The L1 sparsity controller") travels with the weights, as
        # in the authors' checkpoints.
        n_lte, heads = len(config.lte_layers), config.lte["num_kv_heads"]
        shape = {"head": (n_lte, heads), "layer": (n_lte,), "all": ()}[config.lte["l1_lambda_shared"]]
        self.register_buffer("l1_lambda", torch.zeros(shape) if n_lte else None)
        self.register_buffer("num_kept", torch.zeros(n_lte, heads) if n_lte else None)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self, input_ids: torch.Tensor, *, pad_mask: torch.Tensor | None, cache: HybridCache | None
    ) -> tuple[torch.Tensor, tuple[LTERouting, ...] | None]:
        x = self.embeddings(input_ids)
        routing = []
        for i, layer in enumerate(self.layers):
            x, r = layer(x, pad_mask=pad_mask, state=None if cache is None else cache.states[i])
            if r is not None:
                routing.append(r)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        return self.norm(x), (tuple(routing) if routing else None)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, backend=config.backend)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def set_routing_enabled(self, enabled: bool) -> None:
        """Warm-up switch (`l1_warmup_steps`): with routing disabled, LTE layers attend to every earlier token in
        training."""
        for layer in self.model.layers:
            if isinstance(layer.attn, LTEAttention):
                layer.attn.routing_enabled = enabled

    def set_eviction(
        self,
        policy: str | None = "learned",
        *,
        buffer_size: int | None = None,
        seed: int = 0,
        window: int | None = None,
        sink_size: int | None = None,
        prompt_len: int | None = None,
    ) -> None:
        """Inference settings of the layers whose cache an eviction policy bounds, which size caches allocated
        afterwards (`hlsa.layers.eviction`; training always uses the router).

        LTE layers rank keys for their buffer of N = `buffer_size` slots (None: the config's) by `policy`.
        Full-attention layers keep every token under `learned` or None (as trained: `learned` needs an LTE router,
        and a model without LTE layers refuses it); under any other policy they keep sinks + a window + a buffer
        chosen by it, in LTE's constant cache: `window` (None: the LTE layers' W; required in a model without LTE
        layers), `sink_size` (None: the LTE layers', else 4) and `buffer_size` (None: the LTE layers' N, else
        required). `seed` drives the `random` policy, `prompt_len` the prompt of a full forward under `snapkv`
        (None: the whole input). `policy=None` restores every layer as trained."""
        blocks = list(enumerate(self.model.layers))
        lte = [(i, b.attn) for i, b in blocks if isinstance(b.attn, LTEAttention)]
        full = [(i, b.attn) for i, b in blocks if isinstance(b.attn, Attention) and b.attn.window_size is None]
        if not lte and not full:
            raise ValueError("set_eviction: this model has no LTE or full-attention layer (nothing to evict from)")
        if policy == "learned" and not lte:
            raise ValueError("set_eviction: policy 'learned' is an LTE router's, and this model has no LTE layer; "
                             "choose a training-free policy, or None to restore the model as trained")  # fmt: skip
        lte_config = self.config.lte if lte else {}
        n = lte_config.get("buffer_size") if buffer_size is None else buffer_size
        for i, layer in lte:
            layer.set_eviction(Eviction(policy or "learned", seed=seed, layer=i, prompt_len=prompt_len), n)
        if policy in (None, "learned"):
            for _, layer in full:
                layer.set_eviction(None)
            return
        window = lte_config.get("window_size") if window is None else window
        sink_size = lte_config.get("sink_size", 4) if sink_size is None else sink_size
        if full and (window is None or n is None):
            raise ValueError("set_eviction: full-attention layers need a window and a buffer_size (no LTE layer "
                             "to take them from)")  # fmt: skip
        for i, layer in full:
            eviction = Eviction(policy, seed=seed, layer=i, prompt_len=prompt_len)
            layer.set_eviction(eviction, window=window, buffer_size=n, sink_size=sink_size)

    def allocate_cache(self, batch_size: int) -> HybridCache:
        """Decode states for `batch_size` sequences, on the model's device and dtype."""
        param = next(self.parameters())
        states = [
            block.attn.init_state(batch_size, device=param.device, dtype=param.dtype) for block in self.model.layers
        ]
        return HybridCache(states)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        past_key_values: HybridCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs: object,  # generation plumbing (position_ids, ...) that this model does not need
    ) -> HybridOutput:
        """input_ids [B, T]; attention_mask [B, T_total] (1 = token, 0 = left pad); labels [B, T] (shifted here)."""
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a non-empty int64 tensor of shape [batch, length]")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported; pass input_ids")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = self.allocate_cache(input_ids.shape[0])
        if cache is not None and not isinstance(cache, HybridCache):
            raise ValueError(f"cache must be a HybridCache from model.allocate_cache(), got {type(cache).__name__}")
        prefill = cache is None or cache.seen == 0
        pad_mask = _pad_mask(attention_mask, input_ids) if prefill else None
        hidden, routing = self.model(input_ids, pad_mask=pad_mask, cache=cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return HybridOutput(loss=loss, logits=logits, cache=cache, routing=routing)

    # --- transformers generation plumbing ------------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our cache is allocated in prepare_inputs_for_generation

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        cache: HybridCache | None = None,
        past_key_values: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: object,
    ) -> dict:
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = self.allocate_cache(input_ids.shape[0])
        if cache is not None and cache.seen > 0:
            input_ids = input_ids[:, cache.seen :]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}

    def generate(self, *args: object, **kwargs: object) -> torch.Tensor:
        config = kwargs.get("generation_config") or self.generation_config
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if beams > 1:
            raise ValueError(
                "beam search is not supported: GDN/LTE states cannot be reordered between beams; use greedy "
                "decoding or sampling (num_beams=1)"
            )
        return super().generate(*args, **kwargs)


def _pad_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Left-padding mask [B, T] (True = token) for a prefill chunk, or None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)} at prefill"
        )
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    # Left padding only: once a row has started, it must not contain pads (one host sync, at prefill only).
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("right padding is not supported: pad on the left (tokenizer.padding_side = 'left')")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no tokens; every sequence needs at least one token")
    return mask
