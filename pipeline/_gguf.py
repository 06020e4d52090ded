"""GGUF checkpoints (llama.cpp's single-file format): config, weights and tokenizer from one file.

A GGUF file holds metadata (the model's hyper-parameters under ``<arch>.*`` keys, the tokenizer
under ``tokenizer.*``) and tensors under llama.cpp's names (``blk.N.attn_q.weight``), most of
them quantized (Q4_0, Q4_1, Q8_0, K-quants...). `GGUFCheckpoint` presents such a file as a
`Checkpoint` under Hugging Face tensor names, so `load_span` and `load_client_head` load it
unchanged:

- the config is read from the metadata (`gguf_config`): Llama (Mistral GGUFs are written as
  ``llama`` too), Qwen2 and Qwen3, where llama.cpp's mapping is the plain renaming below;
- a read dequantizes only the tensors asked for (`gguf.quants.dequantize`), then casts them to the
  requested dtype; llama.cpp's row permutation of the Llama Q/K projections (its rotary kernel
  pairs adjacent dimensions, Hugging Face's pairs halves) is undone;
- ``dtype="auto"`` is float32 for a quantized file (dequantized values are float32), else the
  file's half type;
- `model_hash` is a SHA-256 over a canonical JSON of the metadata that defines the model (every
  key but the tokenizer's tables and chat template) and the tensor table (name, ggml type,
  shape, and a digest of the first, middle and last 4 KiB of the tensor's stored bytes:
  `pipeline._identity`), tagged ``"format": "gguf"``: stable across paths and copies, distinct
  for two quantizations of one model and for two fine-tunes with the same metadata, and never
  equal to a safetensors checkpoint's.

The header is parsed here (``struct`` over a memory map: ~0.1 s for SmolLM2's 49k-token
vocabulary, where `gguf.GGUFReader` takes ~4 s building a view per array element); the `gguf`
package provides the type table and the dequantization kernels.

`gguf_tokenizer` builds the tokenizer from the vocabulary, merges and token types with the
`tokenizers` library (byte-level BPE, the pre-tokenizer llama.cpp applies for the file's
``tokenizer.ggml.pre``); SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``) are not
supported yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._checkpoint import Checkpoint, LoadReport, _progress
from ._config import ModelConfig, RopeConfig
from ._errors import CheckpointNotFoundError, ConfigError, ModelLoadError, UnsupportedModelError
from ._identity import byte_runs

GGUF_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# metadata value types (GGUFValueType): fixed-size scalars, 8 string, 9 array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_NP_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# ggml types stored as plain values, and the torch dtype each is
_F32, _F16, _BF16 = 0, 1, 30
_FLOAT_TYPES = {_F32: torch.float32, _F16: torch.float16, _BF16: torch.bfloat16}

# GGUF architecture -> (lamina model_type, whether llama.cpp permuted the Q/K rows)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}

# Hugging Face names -> GGUF names (llama.cpp's gguf-py TensorNameMap, Llama-family subset)
HEAD_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
_TO_HF = {v: k for k, v in {**HEAD_NAMES, **BLOCK_NAMES}.items()}

# tokenizer tables and template: left out of the model hash (they do not change the blocks' math)
_UNHASHED = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
             "tokenizer.ggml.scores", "tokenizer.ggml.precompiled_charsmap", "tokenizer.chat_template")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None for one lamina does not use."""
    if gguf_name in _TO_HF:
        return _TO_HF[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _TO_HF:
        return f"model.layers.{parts[1]}.{_TO_HF[parts[2]]}"
    return None


def gguf_name(name: str) -> str:
    """The GGUF name of a Hugging Face tensor name (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``)."""
    if name in HEAD_NAMES:
        return HEAD_NAMES[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in BLOCK_NAMES:
        return f"blk.{parts[2]}.{BLOCK_NAMES[parts[3]]}"
    raise ModelLoadError(f"tensor {name!r} has no GGUF counterpart")


# --- finding a GGUF file --------------------------------------------------------------------

def resolve_gguf(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file `name_or_path` names: itself if it is one (by suffix or magic bytes), or the
    single ``*.gguf`` of a directory without a config.json; None when it is no GGUF checkpoint.
    A directory holding several GGUF files is an error naming them. The embedded model's name
    (``smollm2``, `pipeline._embedded`) is its installed file."""
    from ._embedded import embedded_model_path, is_embedded_name

    if is_embedded_name(name_or_path):
        return embedded_model_path()
    try:
        path = Path(name_or_path).expanduser()
    except TypeError:
        return None
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path.resolve()
        try:
            with open(path, "rb") as fh:
                return path.resolve() if fh.read(4) == GGUF_MAGIC else None
        except OSError:
            return None
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) == 1:
            return found[0].resolve()
        if len(found) > 1:
            raise CheckpointNotFoundError(
                f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                f"pass the path of the one to load")
    return None


# --- the file -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]    # torch order (GGUF stores the fastest-moving dimension first)
    ggml_type: int
    offset: int               # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class _StringArray:
    pos: int
    count: int


class GGUFFile:
    """A GGUF file's metadata and tensor table, parsed without reading tensor data; `open` keeps
    one instance per (path, size, mtime)."""

    _cache: dict[tuple[str, int, int], "GGUFFile"] = {}

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._blob = np.memmap(self.path, mode="r", dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot open GGUF file {self.path}: {e}") from None
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:
            raise ModelLoadError(f"{self.path} is not a valid GGUF file: {e}") from None
        self._config: ModelConfig | None = None
        self._hash: str | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GGUFFile":
        path = Path(path).resolve()
        try:
            st = path.stat()
        except OSError as e:
            raise CheckpointNotFoundError(f"cannot read GGUF file {path}: {e}") from None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in cls._cache:
            cls._cache[key] = cls(path)
        return cls._cache[key]

    # parsing
    def _parse(self) -> None:
        blob = self._blob
        if bytes(blob[:4]) != GGUF_MAGIC:
            raise ValueError("it does not start with the GGUF magic bytes")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
        if version not in _VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (only {_VERSIONS})")
        pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", blob, pos)
            self.metadata[key], pos = self._value(pos + 4, vtype)
        entries = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (ndim,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{ndim}Q", blob, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            entries.append((name, tuple(int(d) for d in reversed(dims)), int(ggml_type), int(offset)))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        self.data_start = (pos + alignment - 1) // alignment * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in entries:
            nbytes = _nbytes(ggml_type, shape, name)
            start = self.data_start + offset
            if start + nbytes > len(blob):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            self.tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._blob, pos)
        pos += 8
        return bytes(self._blob[pos:pos + n]).decode("utf-8"), pos + n

    def _value(self, pos: int, vtype: int) -> tuple[Any, int]:
        if vtype in _SCALAR:
            (v,) = struct.unpack_from(_SCALAR[vtype], self._blob, pos)
            if vtype == 6:   # float32: its shortest decimal (1e-05, not 9.999999747378752e-06)
                v = float(str(np.float32(v)))
            return v, pos + struct.calcsize(_SCALAR[vtype])
        if vtype == _STRING:
            return self._string(pos)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", self._blob, pos)
            pos += 12
            if etype in _NP_SCALAR:
                dt = np.dtype(_NP_SCALAR[etype])
                arr = np.frombuffer(self._blob, dtype=dt, count=count, offset=pos).copy()
                return (arr.astype(bool) if etype == 7 else arr), pos + count * dt.itemsize
            if etype == _STRING:   # walked now, decoded when asked for (a vocabulary: 49k strings)
                start = pos
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", self._blob, pos)
                    pos += 8 + n
                return _StringArray(start, count), pos
            raise ValueError(f"metadata array of type {etype} is not supported")
        raise ValueError(f"metadata value type {vtype} is not supported")

    # reading
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value; string arrays come back as lists of str, numeric ones as arrays."""
        value = self.metadata.get(key, default)
        if isinstance(value, _StringArray):
            out, pos = [], value.pos
            for _ in range(value.count):
                s, pos = self._string(pos)
                out.append(s)
            self.metadata[key] = value = out
        return value

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{self.path} has no general.architecture in its metadata")
        return arch

    @property
    def config(self) -> ModelConfig:
        if self._config is None:
            self._config = gguf_config(self)
        return self._config

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            meta = {k: _jsonable(self.get(k)) for k in self.metadata if k not in _UNHASHED
                    and not k.startswith("tokenizer.chat_template")}
            table = [[t.name, t.ggml_type, list(t.shape), self._sample_digest(t)]
                     for t in sorted(self.tensors.values(), key=lambda t: t.name)]
            text = json.dumps({"format": "gguf", "metadata": meta, "tensors": table}, sort_keys=True,
                              separators=(",", ":"), ensure_ascii=False)
            self._hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self._hash

    def _sample_digest(self, info: TensorInfo) -> str:
        """SHA-256 of the sampled runs of a tensor's stored bytes (`pipeline._identity`)."""
        h = hashlib.sha256()
        for offset, length in byte_runs(info.nbytes):
            h.update(bytes(self._blob[info.offset + offset:info.offset + offset + length]))
        return h.hexdigest()

    @property
    def quantized(self) -> bool:
        return any(t.ggml_type not in _FLOAT_TYPES for t in self.tensors.values())

    def dequantize(self, name: str) -> torch.Tensor:
        """Tensor `name` (a GGUF name) as float32 (or its stored float type), in torch order."""
        info = self.tensors[name]
        raw = self._blob[info.offset:info.offset + info.nbytes]
        if info.ggml_type in _FLOAT_TYPES:
            return torch.from_numpy(np.array(raw)).view(_FLOAT_TYPES[info.ggml_type]).reshape(info.shape)
        gguf = _gguf_package()
        GGMLQuantizationType, dequantize = gguf.GGMLQuantizationType, gguf.quants.dequantize
        rows = raw.reshape(-1, info.nbytes // _rows(info.shape))
        values = dequantize(np.asarray(rows), GGMLQuantizationType(info.ggml_type))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)


def _rows(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


def _nbytes(ggml_type: int, shape: tuple[int, ...], name: str) -> int:
    count = _rows(shape) * shape[-1] if shape else 1
    if ggml_type in _FLOAT_TYPES:
        return count * _FLOAT_TYPES[ggml_type].itemsize
    gguf = _gguf_package()
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"tensor {name} has ggml type {ggml_type}, unknown to the gguf package") from None
    if shape[-1] % block:
        raise ValueError(f"tensor {name}: row length {shape[-1]} is not a multiple of the block size {block}")
    return count // block * size


def _gguf_package():
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise ModelLoadError("reading a quantized GGUF file needs the gguf package: pip install gguf") from None
    return gguf


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return "nan"
    return value


# --- config ---------------------------------------------------------------------------------

def gguf_config(f: GGUFFile) -> ModelConfig:
    """The lamina config a GGUF file's metadata and tensor table describe."""
    try:
        return _gguf_config(f)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{f.path}: malformed GGUF metadata: {e}") from None


def _gguf_config(f: GGUFFile) -> ModelConfig:
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; lamina reads GGUF files of "
            f"{', '.join(ARCHITECTURES)} (Mistral GGUFs are written as llama)")
    model_type, _ = ARCHITECTURES[arch]

    def key(name: str, default: Any = KeyError) -> Any:
        value = f.get(f"{arch}.{name}", None)
        if value is None:
            if default is KeyError:
                raise UnsupportedModelError(f"{f.path}: GGUF metadata lacks {arch}.{name}")
            return default
        return value

    if "rope_freqs.weight" in f.tensors:
        raise UnsupportedModelError(f"{f.path}: per-frequency rope factors (rope_freqs, Llama 3.1+ "
                                    f"rope scaling) are not supported yet")
    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(f"{f.path}: rope scaling {scaling!r} is not supported "
                                    f"(none and linear are)")
    heads = int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, np.ndarray):    # per-layer counts (hybrid models)
        if len(set(kv_heads.tolist())) != 1:
            raise UnsupportedModelError(f"{f.path}: layers with different KV head counts are not supported")
        kv_heads = kv_heads[0]
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rot = int(key("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise UnsupportedModelError(f"{f.path}: rotary embedding over {rot} of {head_dim} head "
                                    f"dimensions (partial rotary) is not supported")
    if "token_embd.weight" not in f.tensors:
        raise ModelLoadError(f"{f.path} has no token_embd.weight")
    vocab = int(key("vocab_size", f.tensors["token_embd.weight"].shape[0]))
    if sliding := f.get(f"{arch}.attention.sliding_window"):
        raise UnsupportedModelError(f"{f.path}: sliding-window attention ({sliding}) from GGUF "
                                    f"is not supported yet")
    eos = [f.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
    bos, pad = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.padding_token_id")
    has = f.tensors.__contains__
    dtype = _file_dtype(f)
    context = int(key("context_length", 4096))
    return ModelConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope=RopeConfig(theta=float(key("rope.freq_base", 10000.0)),
                        type="linear" if scaling == "linear" else "default",
                        factor=float(key("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
                        original_max_position_embeddings=context),
        max_position_embeddings=context,
        attention_bias=has("blk.0.attn_q.bias"),
        o_proj_bias=has("blk.0.attn_output.bias"),
        mlp_bias=has("blk.0.ffn_gate.bias"),
        qk_norm=has("blk.0.attn_q_norm.weight"),
        tie_word_embeddings=not has("output.weight"),
        torch_dtype=str(dtype).removeprefix("torch."),
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        pad_token_id=int(pad) if pad is not None else None,
    )


def _file_dtype(f: GGUFFile) -> torch.dtype:
    """What ``dtype="auto"`` computes in: float32 where any tensor is quantized, else the file's
    half type (its norms are float32 beside half weights), else float32."""
    types = {t.ggml_type for t in f.tensors.values()}
    if not types <= set(_FLOAT_TYPES):
        return torch.float32
    for half in (_BF16, _F16):
        if half in types:
            return _FLOAT_TYPES[half]
    return torch.float32


# --- the checkpoint -------------------------------------------------------------------------

class GGUFCheckpoint(Checkpoint):
    """A GGUF file as a `Checkpoint`: Hugging Face tensor names, dequantized on read.

    Made by ``Checkpoint(path)`` when `path` is a GGUF file or a directory holding exactly one
    (and no config.json). `path` is the file."""

    def __init__(self, name_or_path: str | os.PathLike) -> None:
        path = resolve_gguf(name_or_path)
        if path is None:
            raise CheckpointNotFoundError(f"{name_or_path} is not a GGUF file")
        self.name = str(name_or_path)
        self.path = path
        self.gguf = GGUFFile.open(path)
        self.config = self.gguf.config
        _, self.permuted = ARCHITECTURES[self.gguf.architecture]
        self._names = {hf: g for g in self.gguf.tensors if (hf := hf_name(g)) is not None}
        self.weight_map = {hf: path.name for hf in self._names}

    @property
    def model_hash(self) -> str:
        return self.gguf.model_hash

    def file_of(self, name: str) -> Path:
        if name not in self._names:
            raise ModelLoadError(f"GGUF checkpoint {self.path} lacks tensor {name!r} "
                                 f"({_safe_gguf_name(name)})")
        return self.path

    def stored_dtype(self, name: str) -> torch.dtype:
        self.file_of(name)
        return _file_dtype(self.gguf)

    def tensor_bytes(self, names: list[str]) -> int:
        """Bytes the tensors `names` take in the file (quantized)."""
        for name in names:
            self.file_of(name)
        return sum(self.gguf.tensors[self._names[n]].nbytes for n in names)

    def read(self, names: list[str], dtype: torch.dtype, report: LoadReport) -> dict[str, torch.Tensor]:
        """Dequantize just `names` (Hugging Face names) to `dtype`; the report counts the bytes
        read from the file (quantized)."""
        for name in names:
            self.file_of(name)
        infos = [self.gguf.tensors[self._names[n]] for n in names]
        bar = _progress(sum(i.nbytes for i in infos))
        report.files.append(self.path.name)
        out: dict[str, torch.Tensor] = {}
        try:
            for name, info in zip(names, infos):
                try:
                    t = self.gguf.dequantize(info.name)
                except (NotImplementedError, ValueError) as e:
                    raise ModelLoadError(f"cannot dequantize {info.name} from {self.path}: {e}") from None
                if self.permuted and ".self_attn.q_proj." in name:
                    t = unpermute_rotary(t, self.config.num_attention_heads)
                elif self.permuted and ".self_attn.k_proj." in name:
                    t = unpermute_rotary(t, self.config.num_key_value_heads)
                report.tensors += 1
                report.bytes_read += info.nbytes
                if bar is not None:
                    bar.update(info.nbytes)
                out[name] = t.to(dtype).contiguous()
        finally:
            if bar is not None:
                bar.close()
        return out


def _safe_gguf_name(name: str) -> str:
    try:
        return gguf_name(name)
    except ModelLoadError:
        return "no GGUF name"


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf ``permute`` of Q/K projection rows (weight or bias):
    it reorders each head's rows from halves ``[x0..x(d/2-1), y0..]`` to pairs ``[x0, y0, x1, ...]``."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``permute`` (Hugging Face -> GGUF row order); the inverse of `unpermute_rotary`."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


# --- tokenizer ------------------------------------------------------------------------------

# tokenizer.ggml.pre -> split regex before byte-level BPE (llama.cpp's llama-vocab.cpp); absent:
# GPT-2's regex (the ByteLevel pre-tokenizer's own)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
           "deepseek-r1-qwen": _QWEN2_SPLIT}
# llama.cpp splits every digit off first, then applies GPT-2's regex (the Digits pre-tokenizer of
# these models' tokenizer.json)
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class GGUFTokenizerInfo:
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None


def gguf_tokenizer(f: GGUFFile):
    """(`tokenizers.Tokenizer`, `GGUFTokenizerInfo`) built from a GGUF file's vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{f.path}: GGUF tokenizer model {kind!r} is not supported yet (byte-level BPE, 'gpt2', is)")
    tokens = f.get("tokenizer.ggml.tokens")
    merges = f.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ModelLoadError(f"{f.path}: GGUF metadata lacks the tokenizer's tokens or merges")
    types = f.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)

    alphabet = set(_bytes_to_unicode().values())
    spelled = [t if set(t) <= alphabet else "".join(_bytes_to_unicode()[b] for b in t.encode("utf-8"))
               for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tok = Tokenizer(bpe)
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_FIRST:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>...) are matched whole and skipped in decoding; user-defined
    # ones are matched whole and kept. A control token outside the byte alphabet is a mislabel.
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    if special:
        tok.add_special_tokens(special)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)

    def token_id(k: str) -> int | None:
        v = f.get(f"tokenizer.ggml.{k}_token_id")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    bos, eos = token_id("bos"), token_id("eos")
    single, specials = "$A:0", []
    if f.get("tokenizer.ggml.add_bos_token") and bos is not None:
        single = f"{spelled[bos]}:0 {single}"
        specials.append((spelled[bos], bos))
    if f.get("tokenizer.ggml.add_eos_token") and eos is not None:
        single = f"{single} {spelled[eos]}:0"
        specials.append((spelled[eos], eos))
    if specials:
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    eos_ids = tuple(dict.fromkeys(i for i in (eos, token_id("eot"), token_id("eom")) if i is not None))
    template = f.get("tokenizer.chat_template")
    return tok, GGUFTokenizerInfo(bos, eos_ids, template if isinstance(template, str) else None)


_B2U: dict[int, str] | None = None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level vocabularies use)."""
    global _B2U
    if _B2U is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _B2U = dict(zip(bs, map(chr, cs)))
    return _B2U
