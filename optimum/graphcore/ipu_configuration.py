"""`optimum.graphcore.ipu_configuration`: the IPU config (ipu_trainer's own)."""

from ipu_trainer.config.ipu_config import (
    ALLOWED_POD_TYPES,
    IPU_CONFIG_NAME,
    IncompatibleIPUConfigError,
    IPUConfig,
)

__all__ = ["ALLOWED_POD_TYPES", "IPU_CONFIG_NAME", "IPUConfig", "IncompatibleIPUConfigError"]
