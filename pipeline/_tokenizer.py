"""Text <-> token ids through the `tokenizers` library, when a checkpoint ships tokenizer.json
(or is a GGUF file: the tokenizer is then built from its vocabulary, see `pipeline._gguf`)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


class Tokenizer:
    chat_template: str | None = None   # a Jinja template (GGUF metadata or tokenizer_config.json)

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        self._tok = _Tok.from_file(str(self.path))
        self.eos_token_ids: tuple[int, ...] = ()
        self.bos_token_id: int | None = None
        config = self.path.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                raw = json.loads(config.read_text())
            except json.JSONDecodeError:
                raw = {}
            eos, bos = _token_text(raw.get("eos_token")), _token_text(raw.get("bos_token"))
            if eos is not None and self._tok.token_to_id(eos) is not None:
                self.eos_token_ids = (self._tok.token_to_id(eos),)
            if bos is not None:
                self.bos_token_id = self._tok.token_to_id(bos)
            if isinstance(raw.get("chat_template"), str):
                self.chat_template = raw["chat_template"]

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike) -> "Tokenizer | None":
        """The checkpoint's tokenizer: its tokenizer.json, or a GGUF file's vocabulary."""
        from ._gguf import resolve_gguf

        if (gguf := resolve_gguf(directory)) is not None:
            from ._errors import UnsupportedModelError
            from ._gguf import GGUFFile

            if GGUFFile.open(gguf).get("tokenizer.ggml.model") is None:
                return None                    # a file without a vocabulary: token ids only
            try:
                return cls.from_gguf(gguf)
            except UnsupportedModelError as e:   # the model still runs on token ids
                warnings.warn(f"no tokenizer: {e}", stacklevel=2)
                return None
        path = Path(directory) / "tokenizer.json"
        return cls(path) if path.is_file() else None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Built from a GGUF file's vocabulary, merges and special tokens (byte-level BPE)."""
        from ._gguf import GGUFFile, gguf_tokenizer

        self = cls.__new__(cls)
        self.path = Path(path)
        self._tok, info = gguf_tokenizer(GGUFFile.open(path))
        self.eos_token_ids, self.bos_token_id = info.eos_token_ids, info.bos_token_id
        self.chat_template = info.chat_template
        return self

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tok.id_to_token(int(token_id))

    @property
    def bos_token(self) -> str | None:
        return self.token_text(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.token_text(self.eos_token_ids[0]) if self.eos_token_ids else None

    def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs) -> str:
        """The conversation as the model's chat template renders it, as transformers'
        ``apply_chat_template(..., tokenize=False)`` does: the same Jinja sandbox and options,
        `raise_exception`, `strftime_now`, a non-escaping `tojson`, and the `bos_token` /
        `eos_token` variables. Extra keyword arguments become template variables."""
        from ._chat import render_chat_template

        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template (neither in its GGUF metadata nor in "
                             "tokenizer_config.json)")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    **{k: v for k, v in variables.items() if v is not None})


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
