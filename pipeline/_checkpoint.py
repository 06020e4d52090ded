"""Hugging Face checkpoint loading: only the tensors a span (or the client head) needs.

A checkpoint is a local directory holding ``config.json`` and either one ``model.safetensors``
or shards listed in ``model.safetensors.index.json``; a hub id (``org/name``) is resolved
through the local Hugging Face cache. Nothing is fetched from the network. A GGUF file (or a
directory holding one and no config.json) is a checkpoint too: ``Checkpoint(path)`` is then a
`pipeline._gguf.GGUFCheckpoint`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ._config import ModelConfig
from ._errors import (CheckpointNotFoundError, ModelLoadError, UnsupportedDtypeError)
from ._model import BLOCK_WEIGHTS, HEAD_WEIGHTS, ClientHead, Span, hf_block_names, _wanted

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F64": torch.float64}
_PROGRESS_MIN_BYTES = 256 << 20


@dataclass
class LoadReport:
    """What a load touched: which files were opened and how many tensor bytes were read."""

    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes_read: int = 0


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory, or a hub id found in the local Hugging Face cache (or the embedded
    model's name, ``smollm2``: its GGUF file)."""
    if (gguf := _gguf_file(name_or_path)) is not None and not Path(name_or_path).expanduser().is_dir():
        return gguf
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        if _gguf_file(path) is not None:
            return path
        raise CheckpointNotFoundError(f"{name} is a file; a checkpoint is a directory")
    cache = hub_cache_dir()
    if name.count("/") == 1 and not name.startswith(("/", ".")):
        repo = cache / ("models--" + name.replace("/", "--"))
        snapshots = repo / "snapshots"
        ref = repo / "refs" / "main"
        if ref.is_file():
            snap = snapshots / ref.read_text().strip()
            if snap.is_dir():
                return snap
        if snapshots.is_dir():
            snaps = sorted(p for p in snapshots.iterdir() if p.is_dir())
            if snaps:
                return snaps[-1]
    raise CheckpointNotFoundError(
        f"{name!r} is neither a local directory nor a model in the Hugging Face cache ({cache}); "
        f"download it first (e.g. `huggingface-cli download {name}`) or pass a directory")


def _gguf_file(name_or_path) -> Path | None:
    from ._gguf import resolve_gguf

    return resolve_gguf(name_or_path)


def load_config(checkpoint: str | os.PathLike) -> ModelConfig:
    if (gguf := _gguf_file(checkpoint)) is not None:
        from ._gguf import GGUFFile

        return GGUFFile.open(gguf).config
    path = resolve_checkpoint(checkpoint)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        raw = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(raw)


def model_hash(checkpoint: str | os.PathLike) -> str:
    """Hex SHA-256 of the checkpoint's config.json, canonicalised (sorted keys, compact): the
    same bytes as `crdt.ModelId.from_config(name, raw).config_hash`. For a GGUF file: the hash of
    its metadata and tensor table (`pipeline._gguf.GGUFFile.model_hash`)."""
    import hashlib

    if (gguf := _gguf_file(checkpoint)) is not None:
        from ._gguf import GGUFFile

        return GGUFFile.open(gguf).model_hash
    raw = json.loads((resolve_checkpoint(checkpoint) / "config.json").read_text())
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Checkpoint:
    """Where each tensor of a checkpoint lives, read from headers only."""

    def __new__(cls, name_or_path: str | os.PathLike | None = None, *args, **kwargs):
        if cls is Checkpoint and name_or_path is not None and _gguf_file(name_or_path) is not None:
            from ._gguf import GGUFCheckpoint

            cls = GGUFCheckpoint
        return super().__new__(cls)

    def __init__(self, name_or_path: str | os.PathLike) -> None:
        self.path = resolve_checkpoint(name_or_path)
        self.name = str(name_or_path)
        self.config = load_config(self.path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ModelLoadError(f"{index} is not a valid safetensors index") from None
            self.weight_map: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
        elif single.is_file():
            self.weight_map = {name: single.name for name in _header(single)}
        else:
            raise ModelLoadError(
                f"{self.path} has neither model.safetensors nor model.safetensors.index.json")

    @property
    def model_hash(self) -> str:
        """Hex SHA-256 of the canonical config.json: what nodes and clients match on."""
        return model_hash(self.path)

    def file_of(self, name: str) -> Path:
        try:
            return self.path / self.weight_map[name]
        except KeyError:
            raise ModelLoadError(f"checkpoint {self.path} lacks tensor {name!r}") from None

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def stored_dtype(self, name: str) -> torch.dtype:
        file = self.file_of(name)
        _require_file(file, name)
        info = _header(file)[name]
        try:
            return _ST_DTYPES[info["dtype"]]
        except KeyError:
            raise UnsupportedDtypeError(f"tensor {name} is stored as {info['dtype']}, "
                                        f"which lamina cannot compute in") from None

    def read(self, names: list[str], dtype: torch.dtype, report: LoadReport) -> dict[str, torch.Tensor]:
        """Read just `names`, opening only the files that hold them."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of(name), []).append(name)
        for file, wanted in by_file.items():
            _require_file(file, wanted[0])
        total = sum(_header(f)[n]["nbytes"] for f, ns in by_file.items() for n in ns)
        out: dict[str, torch.Tensor] = {}
        bar = _progress(total)
        try:
            for file, wanted in by_file.items():
                report.files.append(file.name)
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in wanted:
                        try:
                            t = f.get_tensor(name)
                        except Exception as e:  # safetensors raises its own error types
                            raise ModelLoadError(f"cannot read tensor {name} from {file}: {e}") from None
                        report.tensors += 1
                        report.bytes_read += t.nbytes
                        if bar is not None:
                            bar.update(t.nbytes)
                        out[name] = t.to(dtype)
        finally:
            if bar is not None:
                bar.close()
        return out


def _require_file(file: Path, tensor: str) -> None:
    if not file.is_file():
        raise ModelLoadError(f"checkpoint shard {file.name} is missing from {file.parent} "
                             f"(it holds {tensor})")


_HEADER_CACHE: dict[tuple[str, float], dict] = {}


def _header(file: Path) -> dict[str, dict]:
    """name -> {dtype, shape, nbytes} from a safetensors header, without reading tensor data."""
    key = (str(file), file.stat().st_mtime)
    if key in _HEADER_CACHE:
        return _HEADER_CACHE[key]
    try:
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 << 20:
                raise ValueError("header too large")
            raw = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"{file} is not a valid safetensors file: {e}") from None
    out = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = {"dtype": info["dtype"], "shape": info["shape"], "nbytes": end - start}
    _HEADER_CACHE[key] = out
    return out


def _progress(total: int):
    if total < _PROGRESS_MIN_BYTES:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", leave=False)


def resolve_dtype(dtype: str | torch.dtype, checkpoint: Checkpoint, probe_tensor: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UnsupportedDtypeError(f"dtype {dtype} is not supported; use one of "
                                        f"auto, float32, bfloat16, float16")
        return dtype
    if dtype == "auto":
        stored = checkpoint.stored_dtype(probe_tensor)
        return torch.float32 if stored == torch.float64 else stored
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UnsupportedDtypeError(
            f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16") from None


def check_device(device: str | torch.device, dtype: torch.dtype) -> torch.device:
    """Fail early, with a clear message, on a device that is absent or cannot use `dtype`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UnsupportedDtypeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedDtypeError("device cuda was asked for, but no CUDA GPU is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UnsupportedDtypeError("device mps was asked for, but MPS is not available")
    try:
        x = torch.ones(2, 4, dtype=dtype, device=dev)
        torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None])
        (x @ x.T).float().sum().item()
    except (RuntimeError, TypeError) as e:
        raise UnsupportedDtypeError(f"device {dev} cannot compute in {dtype}: {e}") from None
    return dev


def _fuse(config: ModelConfig, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    sd = {}
    for ours, theirs, required in BLOCK_WEIGHTS:
        if not (required or _wanted(config, ours)):
            continue
        parts = [tensors[prefix + n] for n in theirs]
        sd[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return sd


def load_span(checkpoint: str | os.PathLike | Checkpoint, start: int, end: int,
              device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
              report: LoadReport | None = None) -> Span:
    """Load blocks ``[start, end)`` reading only the tensors (and shards) they need."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    config = ckpt.config
    with torch.device("meta"):
        span = Span(config, start, end)        # validates the range before any I/O
    names = [n for i in range(start, end) for n in hf_block_names(config, i)]
    torch_dtype = resolve_dtype(dtype, ckpt, names[0])
    dev = check_device(device, torch_dtype)
    report = report if report is not None else LoadReport()
    tensors = ckpt.read(names, torch_dtype, report)
    for i in range(start, end):
        sd = _fuse(config, tensors, f"model.layers.{i}.")
        _assign(span.layers[i - start], sd, f"block {i}")
    span.to(dev).requires_grad_(False).eval()
    span.load_report = report
    return span


def load_client_head(checkpoint: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype = "auto", report: LoadReport | None = None) -> ClientHead:
    """Load the embeddings, final norm and LM head (tied to the embeddings where configured)."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    config = ckpt.config
    tied = config.tie_word_embeddings or not ckpt.has("lm_head.weight")
    if tied and not config.tie_word_embeddings:
        raise ModelLoadError(f"checkpoint {ckpt.path} lacks lm_head.weight and its config does "
                             f"not tie word embeddings")
    names = [theirs for ours, theirs in HEAD_WEIGHTS if not (tied and ours == "lm_head.weight")]
    torch_dtype = resolve_dtype(dtype, ckpt, names[0])
    dev = check_device(device, torch_dtype)
    report = report if report is not None else LoadReport()
    tensors = ckpt.read(names, torch_dtype, report)
    with torch.device("meta"):
        head = ClientHead(config)
    sd = {ours: tensors[theirs] for ours, theirs in HEAD_WEIGHTS if theirs in tensors}
    if tied:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    _assign(head, sd, "client head")
    head.to(dev).requires_grad_(False).eval()
    head.load_report = report
    return head


def _assign(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, shape in expected.items():
        if name not in sd:
            raise ModelLoadError(f"{what}: checkpoint lacks weights for {name}")
        if tuple(sd[name].shape) != shape:
            raise ModelLoadError(f"{what}: {name} has shape {list(sd[name].shape)}, "
                                 f"config implies {list(shape)}")
    module.load_state_dict(sd, strict=True, assign=True)
