"""Errors raised by the model engine and the client library, named by meaning."""


class LaminaError(Exception):
    """Base of every error lamina raises on purpose."""


class ModelLoadError(LaminaError):
    """A checkpoint could not be loaded (missing files, bad tensors)."""


class CheckpointNotFoundError(ModelLoadError):
    """Neither a local directory nor a cached Hugging Face hub id."""


class ConfigError(ModelLoadError):
    """config.json is malformed."""


class UnsupportedModelError(ModelLoadError):
    """The architecture (or one of its options) is not one lamina implements."""


class InvalidSpanError(LaminaError, ValueError):
    """A block span is out of range or empty."""


class UnsupportedDtypeError(LaminaError, ValueError):
    """The dtype is unknown or the device cannot compute in it."""


class CacheError(LaminaError, ValueError):
    """A step does not fit the session's KV cache (positions, batch, length)."""
