"""kto_lightning: KTO alignment of language models from binary feedback, on Lightning and Hydra.

The Python API (docs/python_api.md): `KTOModule` and `KTODataModule` for one's own Lightning
script, `run_training` for a run from the command line's overrides. They are imported on first
use (PEP 562): `import kto_lightning.data` or an entry point's `--help` does not pay for
Lightning and transformers through this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kto_lightning.errors import ConfigError, DataError, KTOError, ModelLoadError

if TYPE_CHECKING:
    from kto_lightning.api import RunResult, run_training
    from kto_lightning.core.losses import KTOLoss, KTOLossConfig
    from kto_lightning.data import Batching, Columns, KTODataModule, Lengths, Source
    from kto_lightning.models import Pretrained, TinyLlama
    from kto_lightning.models.reference import CopyReference
    from kto_lightning.training.module import KTOModule

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "KTOModule": "kto_lightning.training.module",
    "KTODataModule": "kto_lightning.data",
    "Source": "kto_lightning.data",
    "Columns": "kto_lightning.data",
    "Lengths": "kto_lightning.data",
    "Batching": "kto_lightning.data",
    "KTOLoss": "kto_lightning.core.losses",
    "KTOLossConfig": "kto_lightning.core.losses",
    "CopyReference": "kto_lightning.models.reference",
    "TinyLlama": "kto_lightning.models",
    "Pretrained": "kto_lightning.models",
    "run_training": "kto_lightning.api",
    "RunResult": "kto_lightning.api",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'kto_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once: the next access does not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Batching",
    "Columns",
    "ConfigError",
    "CopyReference",
    "DataError",
    "KTODataModule",
    "KTOError",
    "KTOLoss",
    "KTOLossConfig",
    "KTOModule",
    "Lengths",
    "ModelLoadError",
    "Pretrained",
    "RunResult",
    "Source",
    "TinyLlama",
    "__version__",
    "run_training",
]
