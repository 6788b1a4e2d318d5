"""Eviction pictures: which tokens each LTE head still holds after reading a prompt.

The retained set is the inference rule of docs/design.md, evaluated for the prompt's last query `t = T - 1`: the band
`t - W .. t`, plus, among older keys `j < t - W`, the top-`N` positive scores (sinks, the first `s` tokens, rank as
`+inf`; ties go to the earlier key). That is exactly what the decode cache holds after prefill + the last step.

`inspect_prompt` returns per-token states and kept counts; `render` draws, per LTE layer, a heatmap strip (kv heads x
token positions: evicted / window / retained / sink) above the router score curve, with the needle span marked and the
prompt text as x tick labels. The figure has a fixed pixel size (`figure_size_px`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hlsa.errors import UsageError
from hlsa.loading import tokenize

EVICTED, WINDOW, RETAINED, SINK = 0, 1, 2, 3
STATE_NAMES = ("evicted", "window", "retained", "sink")
STATE_COLORS = ("#e6e6e6", "#9ecae1", "#fd8d3c", "#a50f15")
CURVE_COLORS = ("#54278f", "#006d2c", "#08519c", "#636363", "#9e9ac8", "#74c476", "#6baed6", "#252525")
WIDTH_IN, DPI, HEADER_IN, LAYER_IN = 14.0, 100, 1.4, 2.2


@dataclass
class Inspection:
    """`states[l]` int64 [HKV, T] (EVICTED/WINDOW/RETAINED/SINK), `scores[l]` float [HKV, T] (router scores, raw),
    `kept[l]` int [HKV] (retained buffer entries incl. sinks), for each LTE layer `layers[l]`."""

    layers: list[int]
    states: list[torch.Tensor]
    scores: list[torch.Tensor]
    kept: list[list[int]]
    positive: list[list[float]]
    window: int
    buffer_size: int
    sink_size: int
    tokens: list[str]
    needle: tuple[int, int] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "window_size": self.window, "buffer_size": self.buffer_size, "sink_size": self.sink_size,
            "num_tokens": len(self.tokens), "needle_tokens": list(self.needle) if self.needle else None,
            "layers": [
                {"layer": layer, "kept": kept, "positive_fraction": pos,
                 "needle_retained": self._needle_retained(i)}
                for i, (layer, kept, pos) in enumerate(zip(self.layers, self.kept, self.positive))
            ],
        }  # fmt: skip

    def _needle_retained(self, i: int) -> list[float] | None:
        """Per head: fraction of needle tokens that the last query can still see (window, retained or sink)."""
        if self.needle is None:
            return None
        a, b = self.needle
        return (self.states[i][:, a:b] != EVICTED).float().mean(dim=1).tolist()


def retained_at_end(score: torch.Tensor, *, window: int, buffer_size: int, sink_size: int) -> torch.Tensor:
    """State of every key for the last query of an unpadded sequence.

    Args:
        score: float `[T, HKV]` raw router scores of one sequence.
        window, buffer_size, sink_size: the layer's `W`, `N`, `s`.

    Returns:
        int64 `[HKV, T]` with values EVICTED, WINDOW, RETAINED or SINK.
    """
    t, h = score.shape
    ranked = score.detach().float().clone()
    ranked[:sink_size] = float("inf")
    state = torch.full((h, t), EVICTED, dtype=torch.long)
    older = max(0, t - 1 - window)  # keys j < t_last - W, t_last = T - 1
    state[:, older:] = WINDOW
    if older > 0 and buffer_size > 0:
        cand = ranked[:older].T  # [HKV, older]
        order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[:, :buffer_size]
        keep = cand.gather(-1, order) > 0
        rows = torch.arange(h)[:, None].expand_as(order)
        state[rows[keep], order[keep]] = RETAINED
        sinks = state[:, :sink_size]  # a view: relabel retained sinks in place
        sinks[sinks == RETAINED] = SINK
    return state


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Token range `[a, b)` of the tokens whose character offsets overlap `[start, end)`."""
    hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
    if not hits:
        raise UsageError(f"no token overlaps characters [{start}, {end})")
    return hits[0], hits[-1] + 1


@torch.no_grad()
def inspect_prompt(model: Any, tokenizer: Any, prompt: str, *, needle: tuple[int, int] | None = None) -> Inspection:
    """Run `model` (an hlsa LTE model, eval mode) on `prompt` and compute the retained set of every LTE head.

    `needle` is a character span of `prompt` to mark (or None).
    """
    config = model.config
    if "lte" not in config.mixers:
        raise UsageError("model has no LTE layer: eviction pictures need layer type 'lte'")
    enc = tokenize(tokenizer, prompt, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]], device=next(model.parameters()).device)
    routing = model(input_ids=ids).routing
    lte = config.lte
    states, scores, kept, positive = [], [], [], []
    for r in routing:
        score = r.score[0].float().cpu()  # [T, HKV]
        state = retained_at_end(score, window=lte["window_size"], buffer_size=lte["buffer_size"],
                                sink_size=lte["sink_size"])  # fmt: skip
        states.append(state)
        scores.append(score.T)
        kept.append(((state == RETAINED) | (state == SINK)).sum(dim=1).tolist())
        positive.append((score > 0).float().mean(dim=0).tolist())
    tokens = [tokenizer.decode([i]) for i in enc["input_ids"]]
    span = token_span(enc["offset_mapping"], *needle) if needle is not None else None
    return Inspection(config.lte_layers, states, scores, kept, positive, lte["window_size"], lte["buffer_size"],
                      lte["sink_size"], tokens, span)  # fmt: skip


def format_table(ins: Inspection) -> str:
    """Kept buffer entries per layer x kv head (and the needle's visibility when marked)."""
    heads = len(ins.kept[0]) if ins.kept else 0
    lines = [f"retained after {len(ins.tokens)} tokens (W={ins.window}, N={ins.buffer_size}, s={ins.sink_size})",
             "layer " + "".join(f"{'h' + str(h):>6}" for h in range(heads)) + "   needle seen"]  # fmt: skip
    for i, layer in enumerate(ins.layers):
        seen = ins._needle_retained(i)
        tail = "" if seen is None else "   " + " ".join(f"{x:.2f}" for x in seen)
        lines.append(f"{layer:>5} " + "".join(f"{k:>6}" for k in ins.kept[i]) + tail)
    return "\n".join(lines)


def figure_size_px(num_lte_layers: int) -> tuple[int, int]:
    """(width, height) in pixels of the picture `render` writes for a model with this many LTE layers."""
    return round(WIDTH_IN * DPI), round((HEADER_IN + LAYER_IN * num_lte_layers) * DPI)


def _tick_labels(tokens: list[str], count: int = 48, chars: int = 10) -> tuple[list[int], list[str]]:
    step = max(1, len(tokens) // count)
    ticks = list(range(0, len(tokens), step))
    labels = ["".join(tokens[t : t + chars]).replace("\n", "\u21b5")[:chars] for t in ticks]
    return ticks, labels


def render(ins: Inspection, path: str, *, title: str = "") -> None:
    """Write the PNG picture of `ins` to `path` (size: `figure_size_px(len(ins.layers))`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = len(ins.layers)
    fig = plt.figure(figsize=(WIDTH_IN, HEADER_IN + LAYER_IN * n), dpi=DPI)
    height = fig.get_figheight()
    # Fixed margins in inches (title/legend on top, text tick labels below), the rest split between the layers.
    grid = fig.add_gridspec(
        2 * n, 1, height_ratios=[1.2, 1.0] * n, hspace=0.35, top=1 - 0.45 / height, bottom=0.95 / height, left=0.05
    )
    cmap = ListedColormap(STATE_COLORS)
    t = len(ins.tokens)
    axes = []
    for i, layer in enumerate(ins.layers):
        ax = fig.add_subplot(grid[2 * i], sharex=axes[0] if axes else None)
        ax.imshow(ins.states[i].numpy(), aspect="auto", cmap=cmap, vmin=0, vmax=3, interpolation="nearest",
                  extent=(-0.5, t - 0.5, ins.states[i].shape[0] - 0.5, -0.5))  # fmt: skip
        heads = ins.states[i].shape[0]
        ax.set_yticks(range(heads), [f"h{h}" for h in range(heads)])
        ax.set_ylabel(f"layer {layer}", fontsize=8)
        curve = fig.add_subplot(grid[2 * i + 1], sharex=ax)
        for head, s in enumerate(ins.scores[i]):
            curve.plot(range(t), s.numpy(), lw=0.7, color=CURVE_COLORS[head % len(CURVE_COLORS)], label=f"h{head}")
        curve.legend(loc="upper left", ncol=min(heads, 8), fontsize=6, frameon=False, borderaxespad=0.1)
        curve.axhline(0.0, color="black", lw=0.5)
        curve.set_ylabel("score", fontsize=8)
        axes += [ax, curve]
    for ax in axes:
        ax.tick_params(labelbottom=False, labelsize=7)
        ax.axvline(t - 1 - ins.window - 0.5, color="#3182bd", lw=0.8, ls="--")
        if ins.needle is not None:
            ax.axvspan(ins.needle[0] - 0.5, ins.needle[1] - 0.5, color="#31a354", alpha=0.3)
    ticks, labels = _tick_labels(ins.tokens)
    axes[-1].set_xticks(ticks, labels, rotation=90, fontsize=6, family="monospace")
    axes[-1].tick_params(labelbottom=True)
    axes[-1].set_xlim(-0.5, t - 0.5)
    handles = [Patch(color=c, label=name) for c, name in zip(STATE_COLORS, STATE_NAMES)]
    handles.append(Patch(color="#31a354", alpha=0.3, label="needle"))
    fig.legend(
        handles=handles, loc="upper right", bbox_to_anchor=(0.99, 1.0), ncol=len(handles), fontsize=8, frameon=False
    )
    fig.suptitle(title or f"LTE retained tokens after {t} tokens (W={ins.window}, N={ins.buffer_size})",
                 x=0.05, ha="left", fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
