"""Loading helpers shared by the `hlsa eval` commands (kept free of heavy imports at module level)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hlsa.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    """`device`, or CUDA when available, else CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model(path: str | Path, *, device: torch.device, dtype: str | None = None) -> torch.nn.Module:
    """An hlsa checkpoint directory -> `HybridForCausalLM` in eval mode on `device` (dtype: the checkpoint's)."""
    from hlsa.model import HybridForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"model {path}: not a checkpoint directory (no config.json)")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = HybridForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype] if dtype else "auto")
    return model.to(device).eval()


def load_tokenizer(model_dir: str | Path, tokenizer: str | None) -> Any:
    """`tokenizer` = a tokenizer directory, `"byte"` for hlsa's byte tokenizer, or None for the checkpoint's own
    tokenizer (the byte tokenizer when the checkpoint has none).

    Raises ValueError when the tokenizer has more tokens than the checkpoint's `vocab_size`: its larger ids would
    index past the embeddings (an error on CPU, a device-side assert or garbage on CUDA), and a mismatch usually
    means the checkpoint was trained with another tokenizer.
    """
    from transformers import AutoTokenizer

    from hlsa.tokenizer import byte_tokenizer

    path = Path(tokenizer or model_dir)
    if tokenizer == "byte":
        tok, source = byte_tokenizer(), "hlsa's byte tokenizer"
    elif (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tok, source = AutoTokenizer.from_pretrained(str(path), local_files_only=True), f"the tokenizer of {path}"
    elif tokenizer is not None:
        raise UsageError(f"tokenizer {tokenizer}: no tokenizer.json/tokenizer_config.json there (or pass 'byte')")
    else:
        tok, source = byte_tokenizer(), "hlsa's byte tokenizer (the checkpoint has none)"
    # Checked from config.json rather than the loaded model so that it fails before the weights are read. No config
    # (a tokenizer-only MODEL for `eval niah --export-lm-eval`) leaves nothing to check against.
    config = Path(model_dir) / "config.json"
    vocab_size = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    if vocab_size is not None and len(tok) > vocab_size:
        raise UsageError(
            f"{source} has {len(tok)} tokens but model {model_dir} has vocab_size {vocab_size}; "
            "pass --tokenizer DIR with the tokenizer the model was trained with"
        )
    return tok


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON, creating parent directories."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
