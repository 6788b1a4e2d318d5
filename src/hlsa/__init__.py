"""hlsa: hybrid linear + sparse attention language models.

`import hlsa` is cheap: it imports neither torch nor transformers, so that `hlsa --help` (whose `hlsa.cli` runs this
file first) answers at once. The public classes (`HybridConfig`, `HybridForCausalLM`, `HybridModel`, `HybridCache`)
are loaded on first access (PEP 562 module `__getattr__`).

`import hlsa` still registers `HybridConfig` / `HybridModel` / `HybridForCausalLM` with transformers' Auto classes
(model_type "hlsa"), which `AutoModelForCausalLM.from_pretrained(dir)` and lm-evaluation-harness rely on. Registering
needs the classes, hence torch (transformers' config base class imports it), so it is done at the moment it can be
needed: when transformers is imported, at once if transformers already is. A one-shot finder on `sys.meta_path` sees
the import of `transformers` and of hlsa's own modules and registers once the outermost of those imports has finished
(registering from inside, say, `hlsa.config`'s import of transformers would import `hlsa.model` while `hlsa.config`
is half executed), then removes itself. Nothing else happens at import: no device query, no Triton or fla import
(kernels load lazily on first use).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from importlib.machinery import ModuleSpec
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hlsa.cache import HybridCache
    from hlsa.config import HybridConfig
    from hlsa.model import HybridForCausalLM, HybridModel

try:
    __version__ = version("hlsa")  # the one source is pyproject.toml's [project] version
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "HybridCache": "hlsa.cache",
    "HybridConfig": "hlsa.config",
    "HybridForCausalLM": "hlsa.model",
    "HybridModel": "hlsa.model",
}
__all__ = ["HybridCache", "HybridConfig", "HybridForCausalLM", "HybridModel", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hlsa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def register_auto_classes() -> None:
    """Register hlsa's classes with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM` (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from hlsa.config import HybridConfig
    from hlsa.model import HybridForCausalLM, HybridModel

    AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
    AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
    AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)


class _RegisterOnTransformersImport(importlib.abc.MetaPathFinder):
    """Wraps the loaders of `transformers` and `hlsa.*` to count the imports in progress; when the outermost one has
    finished and transformers is loaded, registers the Auto classes and leaves `sys.meta_path`."""

    def __init__(self) -> None:
        self.depth = 0
        self.done = False

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> ModuleSpec | None:
        if self.done or not (fullname == "transformers" or fullname.startswith("hlsa.")):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CountingLoader(spec.loader, self)
                return spec
        return None

    def finished(self) -> None:
        if self.done or self.depth or "transformers" not in sys.modules:
            return
        self.done = True
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        register_auto_classes()


class _CountingLoader(importlib.abc.Loader):
    """The real loader, with `exec_module` bracketed by the finder's import counter; everything else (`get_source`
    for tracebacks, `get_resource_reader`, ...) is delegated."""

    def __init__(self, loader: Any, finder: _RegisterOnTransformersImport) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._finder.depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._finder.depth -= 1
        self._finder.finished()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


if "transformers" in sys.modules:  # transformers (hence torch) is loaded already: nothing to save by waiting
    register_auto_classes()
else:
    sys.meta_path.insert(0, _RegisterOnTransformersImport())
