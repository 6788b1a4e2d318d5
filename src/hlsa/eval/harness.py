"""lm-evaluation-harness entry point: `python -m hlsa.eval.harness <lm_eval arguments>`.

Importing `hlsa` registers `HybridConfig`/`HybridForCausalLM` with transformers' Auto classes, so lm-eval's stock
`--model hf --model_args pretrained=DIR` loads a saved hlsa checkpoint. This module also registers a `hlsa` model
type: lm-eval's `HFLM` plus one model argument, `kernels=auto|torch`, which sets the checkpoint config's `backend`
(pure-PyTorch reference ops with `torch`, Triton/fla kernels on CUDA with `auto`). Then it hands over to lm-eval's
own command line, exactly as the authors' `evals/harness.py` does for fla.

The authors' RULER command (needs `pip install "lm-eval[ruler]"` and network access for RULER's essays):

    python -m hlsa.eval.harness --output_path OUT --tasks niah_single_1,niah_single_2,niah_single_3 \\
        --model_args pretrained=CKPT,dtype=float32,max_length=16384,add_bos_token=True \\
        --metadata '{"max_seq_lengths": [1024, 2048, 4096]}' --batch_size 32 --show_config

Offline, write local NIAH tasks with `hlsa eval niah --export-lm-eval DIR` and add `--include_path DIR
--tasks hlsa_niah_single_1,...`. lm-eval's supported range for this module: `lm-eval>=0.4.8,<0.5` (with its `hf`
extra, i.e. `accelerate`).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import hlsa  # noqa: F401 - registers the Auto classes that HFLM's loader uses

KERNEL_CHOICES = ("auto", "torch")


@register_model("hlsa")
class HlsaLM(HFLM):
    """`HFLM` for hlsa checkpoints; `kernels` picks the op backend written into the loaded config."""

    def __init__(self, pretrained: Any, kernels: str | None = None, **kwargs: Any) -> None:
        if kernels is not None and kernels not in KERNEL_CHOICES:
            raise ValueError(f"model_args kernels={kernels!r}: choose one of {KERNEL_CHOICES}")
        self._kernels = kernels
        super().__init__(pretrained=pretrained, **kwargs)

    def _create_model(self, pretrained: str, **kwargs: Any) -> None:
        # HFLM forwards unknown keyword arguments to `from_pretrained`, which overrides config fields with them.
        if self._kernels is not None:
            kwargs["backend"] = self._kernels
        super()._create_model(pretrained=pretrained, **kwargs)


def main() -> None:
    """Run lm-eval's command line (arguments from `sys.argv`) with hlsa registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
