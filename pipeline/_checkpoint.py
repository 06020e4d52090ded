"""Hugging Face checkpoint loading: only the tensors a span (or the client head) needs.

A checkpoint is a local directory holding ``config.json`` and either one ``model.safetensors``
or shards listed in ``model.safetensors.index.json``; a hub id (``org/name``) is resolved
through the local Hugging Face cache by `huggingface_hub` (the snapshot its refs/main names).
Nothing is fetched from the network. Files are read through the `safetensors` library:
headers by `safe_open` (no tensor data), tensors by `get_tensor`, identity samples by
`get_slice` (`pipeline._identity`). A GGUF file (or a directory holding one and no config.json)
is a checkpoint too: ``Checkpoint(path)`` is then a `pipeline._gguf.GGUFCheckpoint`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ._config import ModelConfig
from ._errors import CheckpointNotFoundError, ModelLoadError, UnsupportedDtypeError
from ._identity import element_runs, identity_hash
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
    """The Hugging Face hub cache, as `huggingface_hub` finds it ($HF_HUB_CACHE, else
    $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub), read at each
    call (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


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
    if name.count("/") == 1 and not name.startswith(("/", ".")) and (snapshot := _hub_snapshot(name, cache)):
        return snapshot
    raise CheckpointNotFoundError(
        f"{name!r} is neither a local directory nor a model in the Hugging Face cache ({cache}); "
        f"download it first (e.g. `huggingface-cli download {name}`) or pass a directory")


def _hub_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The snapshot of `repo_id` that the cache's refs/main names, through huggingface_hub
    (offline: `local_files_only`), or None. A partly downloaded snapshot is returned as it is:
    the shards a load needs are checked when it reads them."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError

    # newer huggingface_hub: a snapshot the cached file list shows incomplete
    incomplete = getattr(getattr(huggingface_hub, "errors", None), "IncompleteSnapshotError", ())
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
    except incomplete as exc:  # type: ignore[misc]  # (a LocalEntryNotFoundError: caught first)
        return Path(exc.snapshot_path)
    except (LocalEntryNotFoundError, HFValidationError):
        return None


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
    """Hex SHA-256 naming the model: its config and its weights' identity (`pipeline._identity`:
    every tensor's name, dtype, shape and a sample of its bytes), what nodes announce and clients
    match on. For a GGUF file: `pipeline._gguf.GGUFFile.model_hash`."""
    return Checkpoint(checkpoint).model_hash


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
            self.weight_map = {name: single.name for name in _tensor_infos(single)}
        else:
            raise ModelLoadError(
                f"{self.path} has neither model.safetensors nor model.safetensors.index.json")

    @property
    def model_hash(self) -> str:
        """Hex SHA-256 of the config and the weights' identity: what nodes and clients match on
        (`pipeline._identity`). Reads every shard's header and a few KiB of each tensor, once
        per process."""
        files = sorted(set(self.weight_map.values()))
        for file in files:
            _require_file(self.path / file, next(n for n, f in self.weight_map.items() if f == file),
                          why="the model's identity covers every tensor")
        key = (str(self.path.resolve()), tuple((f, *_stamp(self.path / f)) for f in files),
               _stamp(self.path / "config.json"))
        if key not in _IDENTITY_CACHE:
            _IDENTITY_CACHE[key] = _identity(self.path, self.weight_map)
        return _IDENTITY_CACHE[key]

    def file_of(self, name: str) -> Path:
        try:
            return self.path / self.weight_map[name]
        except KeyError:
            raise ModelLoadError(f"checkpoint {self.path} lacks tensor {name!r}") from None

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensor_bytes(self, names: list[str]) -> int:
        """Bytes the tensors `names` take in the checkpoint (read from the headers)."""
        total = 0
        for name in names:
            file = self.file_of(name)
            _require_file(file, name)
            total += _tensor_info(file, name).nbytes
        return total

    def stored_dtype(self, name: str) -> torch.dtype:
        file = self.file_of(name)
        _require_file(file, name)
        stored = _tensor_info(file, name).dtype
        try:
            return _ST_DTYPES[stored]
        except KeyError:
            raise UnsupportedDtypeError(f"tensor {name} is stored as {stored}, "
                                        f"which lamina cannot compute in") from None

    def read(self, names: list[str], dtype: torch.dtype, report: LoadReport) -> dict[str, torch.Tensor]:
        """Read just `names`, opening only the files that hold them."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of(name), []).append(name)
        for file, wanted in by_file.items():
            _require_file(file, wanted[0])
        out: dict[str, torch.Tensor] = {}
        bar = _progress(self.tensor_bytes(names))
        try:
            for file, wanted in by_file.items():
                report.files.append(file.name)
                with _open(file) as f:
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


def _require_file(file: Path, tensor: str, why: str = "") -> None:
    if not file.is_file():
        raise ModelLoadError(f"checkpoint shard {file.name} is missing from {file.parent} "
                             f"(it holds {tensor}{'; ' + why if why else ''})")


@dataclass(frozen=True)
class _TensorInfo:
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: list[int]
    nbytes: int


# bytes per element of each safetensors dtype
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_INFO_CACHE: dict[tuple[str, int, int], dict[str, _TensorInfo]] = {}
_IDENTITY_CACHE: dict[tuple, str] = {}


def _stamp(file: Path) -> tuple[int, int]:
    st = file.stat()
    return st.st_size, st.st_mtime_ns


def _open(file: Path):
    """`safe_open`, its failures (not a safetensors file, truncated) as a `ModelLoadError`."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise ModelLoadError(f"{file} is not a valid safetensors file: {e}") from None


def _tensor_infos(file: Path) -> dict[str, _TensorInfo]:
    """name -> dtype, shape, bytes, from a safetensors header (through `safe_open`: no tensor
    data is read). Cached by path, size and modification time."""
    key = (str(file), *_stamp(file))
    if key not in _INFO_CACHE:
        infos = {}
        with _open(file) as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dtype, shape = sl.get_dtype(), list(sl.get_shape())
                infos[name] = _TensorInfo(dtype, shape, math.prod(shape) * _ST_ITEMSIZE.get(dtype, 1))
        _INFO_CACHE[key] = infos
    return _INFO_CACHE[key]


def _tensor_info(file: Path, name: str) -> _TensorInfo:
    try:
        return _tensor_infos(file)[name]
    except KeyError:
        raise ModelLoadError(f"{file} does not hold tensor {name!r} (its index says it does)") from None


def _identity(path: Path, weight_map: dict[str, str]) -> str:
    """`pipeline._identity`'s hash of a safetensors checkpoint: the config, then every tensor's
    name, dtype, shape and sampled bytes (through `get_slice`: only the sampled runs are read)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path / 'config.json'} cannot be read: {e}") from None
    entries = []
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with _open(path / file) as f:
            for name in names:
                info = _tensor_info(path / file, name)
                try:
                    digest = _sample_digest(f, name, info)
                except Exception as e:  # safetensors raises its own error types
                    raise ModelLoadError(f"cannot read tensor {name} from {path / file}: {e}") from None
                entries.append((name, info.dtype, info.shape, digest))
    return identity_hash("safetensors", {"config": config}, entries)


def _sample_digest(f, name: str, info: _TensorInfo) -> str:
    """SHA-256 of the sampled runs of a tensor's stored bytes (`pipeline._identity`)."""
    runs = element_runs(info.shape, _ST_ITEMSIZE.get(info.dtype, 1))
    parts = [f.get_tensor(name)] if runs is None else [f.get_slice(name)[run] for run in runs]
    h = hashlib.sha256()
    for t in parts:
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
