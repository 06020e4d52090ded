"""Text <-> token ids through the `tokenizers` library, when a checkpoint ships tokenizer.json
(or is a GGUF file: the tokenizer is then built from its vocabulary, see `pipeline._gguf`)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path


class Tokenizer:
    chat_template: str | None = None   # a Jinja template (GGUF metadata or tokenizer_config.json)
    padding_side = "left"              # what `generate` needs; "right" for other uses

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

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None) -> str:
        """The text of `ids`. (`clean_up_tokenization_spaces` is accepted for transformers' habit
        and changes nothing: the text is what tokenizer.json's decoder makes.)"""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def pad_token_id(self) -> int:
        """The id padding uses: the eos token's (decoder-only models have no pad token of their
        own; the attention mask, not the id, marks padding), else 0."""
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def __call__(self, text: str | list[str], padding: bool | str = False, return_tensors: str | None = None,
                 add_special_tokens: bool = True) -> "Encoding":
        """transformers' habit: ``model.generate(**tokenizer(texts, padding=True,
        return_tensors="pt"))``: ``input_ids`` and ``attention_mask`` (0 on the padding, which
        goes on `padding_side`: left by default, as generate needs)."""
        from ._errors import InvalidInputError

        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidInputError("the tokenizer takes a string or a list of strings")
        if padding not in (False, True, "longest", "do_not_pad"):
            raise InvalidInputError(f"padding must be True, False or 'longest', got {padding!r}")
        if self.padding_side not in ("left", "right"):
            raise InvalidInputError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        width = max(len(r) for r in rows)
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest"):
            pads = [width - len(r) for r in rows]
            left = self.padding_side == "left"
            rows = [[self.pad_token_id] * n + r if left else r + [self.pad_token_id] * n for r, n in zip(rows, pads)]
            masks = [[0] * n + m if left else m + [0] * n for m, n in zip(masks, pads)]
        if return_tensors is None:
            out = Encoding(input_ids=rows, attention_mask=masks)
            return out if not isinstance(text, str) else Encoding(input_ids=rows[0], attention_mask=masks[0])
        if return_tensors != "pt":
            raise InvalidInputError(f"return_tensors must be 'pt' (torch) or None, got {return_tensors!r}")
        if any(len(r) != width for r in rows):
            raise InvalidInputError("texts of different lengths need padding=True to make one tensor")
        import torch

        return Encoding(input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks))

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
        import jinja2

        from ._chat import render_chat_template
        from ._errors import ChatTemplateError

        template = chat_template or self.chat_template
        if template is None:
            raise ChatTemplateError("this model has no chat template (neither in its GGUF metadata nor in "
                                    "tokenizer_config.json)")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        try:
            return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                        **{k: v for k, v in variables.items() if v is not None})
        except jinja2.TemplateError as e:    # the template's own raise_exception(...), a syntax error
            raise ChatTemplateError(f"the model's chat template refused these messages: {e}") from e


class Encoding(dict):
    """What calling a tokenizer gives: a dict (``**inputs``) whose keys are attributes too."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
