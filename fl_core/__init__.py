"""fl_core: the learning code shared by the server and the edges.

Plain PyTorch, no web framework: usable from a notebook. Modules: ``backbones``
(registry, cut points), ``model`` (split model), ``features`` (extraction, privacy,
wire packing), ``privacy`` (privacy modes: per-class statistics and virtual
features), ``training`` (train_upper, finetune, evaluate), ``data`` (datasets,
splits, partitions), ``metrics``, ``serialization`` (safetensors + sha256),
``schemas`` (wire models) and ``errors`` (one exception tree).
"""

from fl_core.errors import FedInspectError
from fl_core.model import Arch, HeadConfig, SplitModel, build_split_model
from fl_core.schemas import FeatureSpec, PrivacyConfig

__version__ = "0.1.0"

__all__ = [
    "Arch",
    "FeatureSpec",
    "FedInspectError",
    "HeadConfig",
    "PrivacyConfig",
    "SplitModel",
    "__version__",
    "build_split_model",
]
