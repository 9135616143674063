"""singer-deploy: SiNGER distillation of Vision Transformers and edge export with parity checks."""

from singer_deploy.errors import (BackendUnavailableError, ConfigError, DataError, ExportError, ModelError,
                                  ParityError, SingerDeployError, TrainingError)

__version__ = "0.1.0"

from singer_deploy.api import distill_and_export  # noqa: E402  (api reads __version__ above)

__all__ = [
    "BackendUnavailableError", "ConfigError", "DataError", "ExportError", "ModelError", "ParityError",
    "SingerDeployError", "TrainingError", "__version__", "distill_and_export",
]
