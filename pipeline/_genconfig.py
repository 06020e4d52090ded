"""Generation options the Hugging Face way, merged from three places (later wins):

1. the checkpoint's ``generation_config.json`` (an instruct model's default sampling and its
   extra end-of-turn eos ids; a GGUF file has none), read once at load time;
2. a ``generation_config=`` argument: a transformers `GenerationConfig` (only what it sets:
   its ``to_diff_dict()``), a dict, or lamina's own `GenerationConfig`;
3. the call's keyword arguments.

Length options go together: a layer that sets ``max_new_tokens`` or ``max_length`` replaces
both of the layers below it (and likewise ``min_new_tokens`` / ``min_length``). transformers
options lamina does not implement are refused by name, unless they have the value that changes
nothing (``num_beams=1``, ``use_cache=True`` ...); the file's are ignored, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

from ._errors import InvalidOptionError, LaminaError, UnknownOptionError

log = logging.getLogger("lamina.generation")

# options lamina reads from a generation config (besides the GenerationConfig fields it has)
LENGTHS = (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length"))
_ANY = object()
# transformers options at the values that change nothing lamina does
NEUTRAL: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "use_cache": _ANY,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
    "output_attentions": False, "output_hidden_states": False, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "length_penalty": _ANY, "early_stopping": _ANY, "renormalize_logits": False,
    "remove_invalid_values": False, "low_memory": _ANY, "synced_gpus": _ANY,
}
# what a generation config says about the model rather than about a generation
METADATA = frozenset({"transformers_version", "_from_model_config", "_commit_hash", "bos_token_id",
                      "decoder_start_token_id", "cache_implementation", "cache_config", "return_legacy_cache",
                      "compile_config", "disable_compile"})


def known_options(fields: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(fields) | {name for pair in LENGTHS for name in pair} | {"stop_token_ids"}


def check_options(options: Mapping[str, Any], known: frozenset[str], source: str = "") -> dict[str, Any]:
    """`options` without the neutral and metadata ones; `UnknownOptionError` naming the rest
    that lamina does not implement."""
    kept, refused = {}, []
    for name, value in options.items():
        if name in known:
            kept[name] = value
        elif name in METADATA or (name in NEUTRAL and NEUTRAL[name] in (_ANY, value)):
            continue
        else:
            refused.append(f"{name}={value!r}" if name in NEUTRAL else name)
    if refused:
        hint = " (lamina does greedy decoding and sampling: no beams, one sequence per row)" \
            if any(r.split("=")[0] in NEUTRAL for r in refused) else ""
        raise UnknownOptionError(f"unknown generation option(s){source}: {', '.join(sorted(refused))}{hint}")
    return kept


def options_of(generation_config: Any, known: frozenset[str]) -> dict[str, Any]:
    """What a ``generation_config=`` argument sets."""
    from ._generation import GenerationConfig

    if generation_config is None:
        return {}
    if isinstance(generation_config, Mapping):
        return check_options(dict(generation_config), known, " in generation_config")
    if isinstance(generation_config, GenerationConfig):
        default = GenerationConfig()
        return {f.name: getattr(generation_config, f.name) for f in dataclasses.fields(GenerationConfig)
                if f.compare and getattr(generation_config, f.name) != getattr(default, f.name)}
    if callable(getattr(generation_config, "to_diff_dict", None)):   # transformers' GenerationConfig
        return check_options(generation_config.to_diff_dict(), known, " in generation_config")
    raise InvalidOptionError(f"generation_config must be a transformers GenerationConfig, a dict or a "
                             f"pipeline.GenerationConfig, not {type(generation_config).__name__}")


def merge(layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The layers' options, later ones winning; a layer's length option replaces the pair."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for pair in LENGTHS:
            if any(layer.get(name) is not None for name in pair):
                for name in pair:
                    merged.pop(name, None)
        merged.update(layer)
    return merged


def read_generation_config(checkpoint: Any) -> dict[str, Any]:
    """The defaults a Hugging Face checkpoint's generation_config.json sets (none for a GGUF
    file). Options lamina does not implement, and a file that is not valid, are ignored with a
    warning: the model still runs, with lamina's defaults."""
    from ._generation import GenerationConfig

    path = Path(checkpoint.path)
    file = path / "generation_config.json"
    if not path.is_dir() or not file.is_file():        # a GGUF checkpoint's path is its file
        return {}
    try:
        raw = json.loads(file.read_text())
        if not isinstance(raw, dict):
            raise ValueError("it does not hold a JSON object")
    except (OSError, ValueError) as e:
        warnings.warn(f"{file} ignored: {e}", stacklevel=3)
        return {}
    known = known_options(GenerationConfig.__dataclass_fields__)
    ignored = sorted(n for n, v in raw.items() if n not in known and n not in METADATA
                     and not (n in NEUTRAL and NEUTRAL[n] in (_ANY, v)))
    if ignored:
        warnings.warn(f"{file}: lamina does not implement {', '.join(ignored)}; ignored", stacklevel=3)
    defaults = {n: v for n, v in raw.items() if n in known}
    try:
        GenerationConfig.build(model_defaults=defaults, prompt_length=0)
    except LaminaError as e:
        warnings.warn(f"{file} ignored: {e}", stacklevel=3)
        return {}
    log.debug("generation defaults from %s: %s", file, defaults)
    return defaults
