"""`Tensor`: a dtype, a shape and little-endian bytes, carried as raw payload after a frame header.

Conversion to and from torch shares memory where it can: `Tensor.from_torch` views a contiguous
CPU tensor's bytes without copying, and `Tensor.to_torch` wraps received bytes with
`torch.frombuffer` (the decoder gives every frame its own writable buffer, so this is zero-copy
on receive). torch is imported lazily (the wire format itself does not need it), so import torch
before starting a host: a first import inside the event loop blocks it for seconds, and peers
then see a frozen node.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._constants import MAX_TENSOR_NDIM
from ._errors import LocalProtocolError

if TYPE_CHECKING:  # pragma: no cover
    import torch

if sys.byteorder != "little":  # pragma: no cover - every platform torch supports today
    raise ImportError("lamina's wire format is little-endian; big-endian hosts are not supported")

# wire name -> item size in bytes. The wire name is also the torch attribute name.
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


# The wire names numpy has a dtype for (`Tensor.from_torch` converts these with `numpy()`).
_NUMPY_NAMES = frozenset(DTYPE_SIZES) - {"bfloat16", "float8_e4m3fn", "float8_e5m2"}

_TORCH_DTYPES: dict[str, Any] = {}  # wire name -> torch dtype, filled as names are met


def _torch_dtype(name: str) -> "torch.dtype":
    dtype = _TORCH_DTYPES.get(name)
    if dtype is None:
        import torch

        dtype = _TORCH_DTYPES[name] = getattr(torch, name)
    return dtype


_WIRE_NAMES: dict[Any, str] = {}  # torch dtype -> wire name, filled as dtypes are met


def _wire_dtype(dtype: "torch.dtype") -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise LocalProtocolError(f"dtype {dtype} cannot be sent; supported: {sorted(DTYPE_SIZES)}")
    _WIRE_NAMES[dtype] = name
    return name


@dataclass(frozen=True, eq=False, slots=True)
class Tensor:
    """An n-dimensional array on the wire: `dtype` (a name in `DTYPE_SIZES`), `shape`, `data`.

    `data` is any C-contiguous buffer (bytes, bytearray, memoryview, numpy array) holding exactly
    ``numel * itemsize`` little-endian bytes; it is kept as a byte memoryview without copying.
    """

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise LocalProtocolError(f"unknown tensor dtype {self.dtype!r}; supported: {sorted(DTYPE_SIZES)}")
        shape = self.shape
        if not isinstance(shape, (tuple, list)):
            raise LocalProtocolError(f"tensor shape must be a tuple of ints, got {type(shape).__name__}")
        if len(shape) > MAX_TENSOR_NDIM:
            raise LocalProtocolError(f"tensor has {len(shape)} dimensions, at most {MAX_TENSOR_NDIM} allowed")
        for dim in shape:
            if type(dim) is not int or dim < 0:
                raise LocalProtocolError(f"tensor dimensions must be non-negative ints, got {shape!r}")
        object.__setattr__(self, "shape", tuple(shape))
        try:
            view = self.data if isinstance(self.data, memoryview) else memoryview(self.data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
        except (TypeError, ValueError) as exc:
            raise LocalProtocolError(f"tensor data must be a C-contiguous buffer: {exc}") from exc
        expected = math.prod(self.shape) * DTYPE_SIZES[self.dtype]
        if view.nbytes != expected:
            raise LocalProtocolError(
                f"tensor data has {view.nbytes} bytes, {self.dtype}{list(self.shape)} needs {expected}"
            )
        object.__setattr__(self, "data", view)

    @classmethod
    def _trusted(cls, dtype: str, shape: tuple[int, ...], data: memoryview) -> "Tensor":
        """Construct without re-validating (the decoder has already checked all of it)."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "dtype", dtype)
        object.__setattr__(obj, "shape", shape)
        object.__setattr__(obj, "data", data)
        return obj

    # -- properties --------------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # -- conversions -------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, tensor: "torch.Tensor") -> "Tensor":
        """Wrap a torch tensor. Contiguous CPU tensors are shared, not copied: do not modify
        the tensor until the message carrying it has been sent."""
        name = _WIRE_NAMES.get(tensor.dtype) or _wire_dtype(tensor.dtype)
        t = tensor.detach() if tensor.requires_grad else tensor
        if not t.is_cpu:
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        # everything checked by construction: dtype known, shape from torch, bytes exact.
        # A step sends this once per hop, right after a sleep: with cold caches each torch op
        # costs tens of microseconds, so the usual dtypes take the one-op path (`numpy()`).
        if name in _NUMPY_NAMES:
            array = t.numpy()
            data = memoryview(array).cast("B") if array.size else memoryview(b"")
            return cls._trusted(name, tuple(t.shape), data)
        import torch  # bfloat16, float8: numpy has no such dtype; view the bytes instead

        shape = tuple(t.shape)
        if t.numel() == 0:
            return cls._trusted(name, shape, memoryview(b""))
        return cls._trusted(name, shape, memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    def to_torch(self) -> "torch.Tensor":
        """A torch tensor over the same bytes when they are writable (the receive path), else a
        copy (torch cannot safely alias read-only memory)."""
        import torch

        dtype = _torch_dtype(self.dtype)
        numel = self.numel
        if numel == 0:
            return torch.empty(self.shape, dtype=dtype)
        buffer: Any = self.data if not self.data.readonly else bytearray(self.data)
        return torch.frombuffer(buffer, dtype=dtype, count=numel).view(self.shape)

    # -- value semantics ---------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        if self.dtype != other.dtype or self.shape != other.shape:
            return False
        import numpy  # memoryview == compares element by element in Python: 40 us per 16 KiB

        return bool(numpy.array_equal(numpy.frombuffer(self.data, numpy.uint8), numpy.frombuffer(other.data, numpy.uint8)))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Tensor({self.dtype}{list(self.shape)}, {self.nbytes} bytes)"
