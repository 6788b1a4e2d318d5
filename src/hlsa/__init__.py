"""hlsa: hybrid linear + sparse attention language models.

Importing the package registers `HybridConfig` / `HybridForCausalLM` with transformers' Auto classes (model_type
"hlsa"), which `from_pretrained` and lm-evaluation-harness rely on. Nothing else happens at import: no device query,
no Triton or fla import (kernels load lazily on first use).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hlsa.cache import HybridCache
from hlsa.config import HybridConfig
from hlsa.model import HybridForCausalLM, HybridModel

__version__ = "0.1.0"
__all__ = ["HybridCache", "HybridConfig", "HybridForCausalLM", "HybridModel"]

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
