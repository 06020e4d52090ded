"""Errors raised by the model engine and the client library, named by meaning.

`LaminaError` is the root of every error lamina raises on purpose, the p2p layer's included
(`p2p.P2PError` is one); it is defined in `p2p._errors`, the lowest layer, and is the same class
here. Errors about a caller's arguments are also `ValueError` or `TypeError`, as Python's own
would be, so code written for transformers that catches those keeps working.
"""

import queue

from p2p._errors import LaminaError

__all__ = [
    "LaminaError", "ModelLoadError", "CheckpointNotFoundError", "ConfigError", "UnsupportedModelError",
    "InvalidSpanError", "UnsupportedDtypeError", "CacheError", "InvalidOptionError", "UnknownOptionError",
    "InvalidInputError", "ChatTemplateError", "SwarmUnavailableError", "ModelClosedError", "StreamTimeoutError",
    "SpotCheckError",
]


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


class InvalidOptionError(LaminaError, ValueError):
    """An option has a value lamina cannot use (out of range, contradicting another option)."""


class UnknownOptionError(LaminaError, TypeError):
    """An option lamina does not know, or one of transformers' that it does not implement."""


class InvalidInputError(LaminaError, ValueError, TypeError):
    """An input is not what the call needs: input ids or an attention mask of the wrong shape,
    type or range, chat messages that are not dicts (a `TypeError` too, for either habit)."""


class ChatTemplateError(InvalidInputError):
    """The model has no chat template, or its template refused the messages."""


class SwarmUnavailableError(LaminaError):
    """The swarm could not be reached, does not serve this model, or the connection to it failed."""


class ModelClosedError(LaminaError):
    """The model (or an inference session of it) was closed; it can no longer run anything."""


class StreamTimeoutError(LaminaError, queue.Empty, TimeoutError):
    """A text streamer's iterator waited longer than its `timeout` for the next piece of text
    (a `queue.Empty`, as transformers' `TextIteratorStreamer` raises, and a `TimeoutError`)."""


class SpotCheckError(LaminaError):
    """A faulty node's outputs (found by a spot check, `pipeline._spotcheck`) reached tokens this
    client can no longer take back: streamed already, or returned by an earlier call on the same
    session."""
