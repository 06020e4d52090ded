"""lamina's model engine and client library.

Engine: `load_span(checkpoint, start, end, device, dtype)` gives a `Span` of transformer blocks,
called as ``span(hidden, positions, cache)``; `load_client_head` gives what a client holds
(embeddings, final norm, LM head). `generate` runs over any ``step(hidden, start)`` callable.
Every error lamina raises on purpose is a `LaminaError` (the p2p layer's `P2PError` too).
"""

from ._checkpoint import (Checkpoint, LoadReport, check_device, load_client_head, load_config,
                          load_span, model_hash, resolve_checkpoint)
from ._config import SUPPORTED_ARCHITECTURES, ModelConfig
from ._errors import (CacheError, ChatTemplateError, CheckpointNotFoundError, ConfigError, InvalidInputError,
                      InvalidOptionError, InvalidSpanError, LaminaError, ModelClosedError, ModelLoadError,
                      SpotCheckError, StreamTimeoutError, SwarmUnavailableError, UnknownOptionError,
                      UnsupportedDtypeError, UnsupportedModelError)
from ._generation import GenerationConfig, agenerate, generate, next_tokens
from ._local import CausalLMOutput, LocalModelForCausalLM
from ._model import ClientHead, KVCache, Segment, Span
from ._streamers import IncrementalDecoder, TextIteratorStreamer, TextStreamer
from ._tokenizer import Tokenizer

__all__ = [
    "Checkpoint", "LoadReport", "check_device", "load_client_head", "load_config", "load_span",
    "model_hash", "resolve_checkpoint", "SUPPORTED_ARCHITECTURES", "ModelConfig", "CacheError",
    "CheckpointNotFoundError", "ConfigError", "InvalidSpanError", "LaminaError", "ModelLoadError",
    "UnsupportedDtypeError", "UnsupportedModelError", "InvalidOptionError", "UnknownOptionError",
    "InvalidInputError", "ChatTemplateError", "SwarmUnavailableError", "ModelClosedError",
    "StreamTimeoutError", "SpotCheckError", "GenerationConfig", "agenerate", "generate", "next_tokens", "CausalLMOutput",
    "LocalModelForCausalLM", "ClientHead", "KVCache", "Segment", "Span", "IncrementalDecoder",
    "TextStreamer", "TextIteratorStreamer", "Tokenizer",
]

# The client library pulls in libp2p (0.6 s to import): load it only when asked for.
_LAZY = {
    "DistributedModelForCausalLM": "._client",
    "AsyncDistributedModelForCausalLM": "._client",
    "RemoteSession": "._client",
    "SpotCheckStats": "._spotcheck",
    "NoReplacementError": "._chain",
    "RemoteStepError": "._chain",
    "TooManyFailuresError": "._chain",
    "ReplyInterrupted": "._chat",
    "NoRouteError": "._routing",
    "LocalSwarm": ".launch",
}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
