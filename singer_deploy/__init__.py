"""singer-deploy: SiNGER distillation of Vision Transformers and edge export with parity checks."""

from singer_deploy.errors import (BackendUnavailableError, ConfigError, DataError, ExportError, ModelError,
                                  ParityError, SingerDeployError, TrainingError)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "ConfigError", "DataError", "ExportError", "ModelError", "ParityError",
    "SingerDeployError", "TrainingError", "__version__",
]
