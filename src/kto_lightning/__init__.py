"""kto_lightning: KTO alignment of language models from binary feedback, on Lightning and Hydra."""

from kto_lightning.errors import ConfigError, DataError, KTOError, ModelLoadError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "KTOError", "ModelLoadError", "__version__"]
