"""Loading a checkpoint and its tokenizer for the commands that run a model (`hlsa generate`, `hlsa eval`, `hlsa demo`).

Every check here turns a bad path or file into a `UsageError` that names the file and the fix, before any weight is
read where that is possible:

- the device must exist on this machine (`pick_device`);
- `config.json` must be a readable JSON object of model_type "hlsa" that `HybridConfig` accepts;
- the weights (`model.safetensors`, or the shards a `model.safetensors.index.json` names inside the directory) must be
  readable, complete safetensors files;
- the weights must match the model the config describes: a missing, unexpected or differently shaped tensor is an
  error (transformers would initialise or drop it at random and carry on), unless the caller passes
  `allow_partial=True`;
- a tokenizer comes from a local directory or is hlsa's byte tokenizer, never from the network, and has no more ids
  than the model's `vocab_size`.

torch and transformers are imported inside the functions, so the command-line modules may import the names here
(`DTYPE_NAMES`) while `hlsa --help` stays free of torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hlsa.errors import UsageError, check_readable_file, write_error

if TYPE_CHECKING:
    import torch

    from hlsa.config import HybridConfig
    from hlsa.model import HybridForCausalLM

DTYPE_NAMES = ("float32", "bfloat16", "float16")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of `DTYPE_NAMES`."""
    import torch

    if name not in DTYPE_NAMES:
        raise UsageError(f"dtype must be one of {list(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def pick_device(device: str | None = None) -> torch.device:
    """`device` checked against this machine (`cpu`, `cuda`, `cuda:N`); None or `auto`: CUDA when available, else the
    CPU."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r}: no CUDA device is visible on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
        return dev
    # meta holds no data, and the other device types have no kernels in hlsa.
    raise UsageError(f"device {device!r}: hlsa runs models on cpu or cuda; use --device cpu or --device cuda")


def read_config(model_dir: str | Path) -> HybridConfig:
    """The `HybridConfig` of a checkpoint directory, from a `config.json` that is checked first."""
    from hlsa.config import HybridConfig

    path = Path(model_dir)
    if not path.is_dir():
        what = "no such directory" if not path.exists() else "a file, not a directory"
        raise UsageError(f"model {path}: {what}; pass a checkpoint directory (config.json + model.safetensors)")
    file = path / CONFIG_FILE
    if not file.exists():
        raise UsageError(
            f"model {path}: not a checkpoint directory (no config.json); pass a directory that "
            "`hlsa train --checkpoint.export` or `save_pretrained` wrote"
        )
    check_readable_file(file, "the model's config", fix="restore the checkpoint's config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{file}: not valid JSON ({e}); restore the checkpoint's config.json") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{file}: expected a JSON object, got {type(raw).__name__}; restore the checkpoint's config")
    if raw.get("model_type") != HybridConfig.model_type:
        raise UsageError(
            f"{file}: model_type is {raw.get('model_type')!r}, not 'hlsa'; checkpoints of the authors' code need "
            "`hlsa convert SRC DST` first"
        )
    try:
        return HybridConfig.from_pretrained(str(path))
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"{file}: not a valid hlsa config: {e}") from None


def check_weights(model_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, each checked to be a readable, complete safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(model_dir)
    index = path / WEIGHTS_INDEX_FILE
    if index.exists() and not (path / WEIGHTS_FILE).exists():
        check_readable_file(index, "the index of the sharded weights", fix="restore it or re-export")
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{index}: not a valid safetensors index ({e!r}); restore it or re-export") from None
        files = []
        for name in names:
            file = (path / name).resolve()
            if not isinstance(name, str) or file.parent != path.resolve():
                raise UsageError(f"{index}: shard {name!r} is not a file of {path}; refusing to read outside it")
            files.append(path / name)
    else:
        files = [path / WEIGHTS_FILE]
    for file in files:
        check_readable_file(file, "the model weights", fix="export the checkpoint again")
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise UsageError(
                f"{file}: not a complete safetensors file ({e}); it was truncated or damaged, export it again"
            ) from None
    return files


def load_model(
    model_dir: str | Path,
    *,
    device: torch.device | None = None,
    dtype: str | None = None,
    allow_partial: bool = False,
) -> HybridForCausalLM:
    """An hlsa checkpoint directory -> `HybridForCausalLM` in eval mode on `device` (default: the CPU).

    Args:
        dtype: one of `DTYPE_NAMES`; None keeps the checkpoint's.
        allow_partial: load even when tensors are missing, unexpected or differently shaped (those are then
            initialised at random or dropped, and a warning lists them); otherwise that is a `UsageError`.
    """
    import warnings

    from transformers.utils import logging as hf_logging

    from hlsa.model import HybridForCausalLM

    config = read_config(model_dir)
    torch_type = torch_dtype(dtype) if dtype is not None else "auto"
    check_weights(model_dir)
    # transformers prints a progress bar and its own load report; the report is replaced by the check below.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = HybridForCausalLM.from_pretrained(
            str(model_dir), config=config, dtype=torch_type, output_loading_info=True, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    problems = _loading_problems(info)
    if problems:
        text = f"the weights in {model_dir} do not match its config.json: " + "; ".join(problems)
        if not allow_partial:
            raise UsageError(
                f"{text}. The config and the weights come from different models; restore the checkpoint's own "
                "config.json (or pass --allow-partial-weights to load it anyway, with those tensors random)"
            )
        warnings.warn(text + " (loaded anyway: those tensors are random)", stacklevel=2)
    return model.to(device if device is not None else "cpu").eval()


def _loading_problems(info: dict[str, Any], shown: int = 4) -> list[str]:
    """A phrase per kind of mismatch in transformers' loading info, naming the first few tensors."""
    kinds = {
        "missing_keys": "missing from the weights (would be random)",
        "unexpected_keys": "in the weights but not in the model (would be dropped)",
        "mismatched_keys": "of another shape in the weights",
    }
    problems = []
    for key, phrase in kinds.items():
        names = sorted(k[0] if isinstance(k, tuple) else str(k) for k in info.get(key) or ())
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            problems.append(f"{len(names)} tensor(s) {phrase}: {', '.join(names[:shown])}{more}")
    problems += [str(m) for m in info.get("error_msgs") or ()]
    return problems


def load_tokenizer(model_dir: str | Path, tokenizer: str | None = None) -> Any:
    """The tokenizer for a checkpoint, from a local path only.

    Args:
        model_dir: the checkpoint directory (a directory without config.json is accepted as a tokenizer-only MODEL).
        tokenizer: a local tokenizer directory, `"byte"` for hlsa's byte tokenizer, or None for the checkpoint's own
            tokenizer (the byte tokenizer when the checkpoint has none).

    Raises `UsageError` when `tokenizer` is not a local tokenizer directory (hlsa never downloads one) or when the
    tokenizer has more ids than the checkpoint's `vocab_size`: its larger ids would index past the embeddings, and a
    mismatch usually means the checkpoint was trained with another tokenizer.
    """
    from transformers import AutoTokenizer

    from hlsa.tokenizer import builtin_tokenizer, byte_tokenizer

    # The config first: it is checked before anything else reads it (AutoTokenizer does), and its vocab_size
    # bounds the tokenizer. No config.json: a tokenizer-only MODEL (`hlsa eval niah --export-lm-eval`).
    has_config = (Path(model_dir) / CONFIG_FILE).exists()
    vocab_size = read_config(model_dir).vocab_size if has_config else None
    path = Path(tokenizer or model_dir)
    builtin = builtin_tokenizer(tokenizer)
    if builtin is not None:
        tok, source = builtin, "hlsa's byte tokenizer"
    elif any((path / name).is_file() for name in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            if (path / name).exists():
                check_readable_file(path / name, "the tokenizer", fix="restore the tokenizer's files")
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"tokenizer {path}: cannot be loaded ({e})") from None
        source = f"the tokenizer of {path}"
    elif tokenizer is not None:
        where = "is not a local directory" if not path.is_dir() else "holds no tokenizer.json / tokenizer_config.json"
        raise UsageError(
            f"tokenizer {tokenizer} {where}; hlsa loads tokenizers from local directories only (download a hub "
            "tokenizer first, e.g. `hf download NAME --local-dir DIR`), or pass --tokenizer byte"
        )
    else:
        tok, source = byte_tokenizer(), "hlsa's byte tokenizer (the checkpoint has none)"
    if vocab_size is not None and len(tok) > vocab_size:
        raise UsageError(
            f"{source} has {len(tok)} tokens but model {model_dir} has vocab_size {vocab_size}; "
            "pass --tokenizer DIR with the tokenizer the model was trained with"
        )
    return tok


def tokenize(tokenizer: Any, text: str, **kwargs: Any) -> Any:
    """`tokenizer(text, **kwargs)`, with text outside a closed vocabulary (the synthetic tasks' tokenizers have no
    unknown token) reported as a `UsageError` that shows the vocabulary."""
    try:
        return tokenizer(text, **kwargs)
    except Exception as e:  # `tokenizers` raises a bare Exception for a word its vocabulary lacks
        if "Missing [UNK]" not in str(e):
            raise
        sample = " ".join(tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), 6)))))
        raise UsageError(
            f"the text has words outside the tokenizer's vocabulary of {len(tokenizer)} symbols "
            f"(e.g. {sample} ...); write it in those symbols, separated by spaces"
        ) from None


def is_text_tokenizer(tokenizer: Any) -> bool:
    """Whether `tokenizer` can encode English prose (not so a synthetic task's closed vocabulary)."""
    try:
        tokenize(tokenizer, "The special magic number is 1234567.")
    except UsageError:
        return False
    return True


def check_output_path(path: str | Path, *, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse an output file that cannot be written (or lacks one of `suffixes`) before any work starts.

    Creates the missing parent directories, as the writer would; a file that did not exist is not left behind.
    """
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise UsageError(f"{out}: the output must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise UsageError(f"{out} is a directory; pass a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{out}: cannot create its directory ({e.strerror}); choose another path") from None
    error = write_error(out)
    if error is not None:
        raise UsageError(f"{out}: cannot be written ({error.strerror or error}); choose another path")
    return out
