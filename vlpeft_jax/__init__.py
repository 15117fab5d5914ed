"""vlpeft_jax: parameter-efficient fine-tuning of vision-language models in JAX/Flax."""

from vlpeft_jax.errors import CheckpointError, ConfigError, InputError, OfflineError, VLPeftError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "InputError", "OfflineError", "VLPeftError", "__version__"]
