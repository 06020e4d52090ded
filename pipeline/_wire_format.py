"""Hidden states on the wire: a client's choice of format, and the int8 blockwise packing.

A session's wire format is named in `OpenSession.dtype` (see `pipeline.protocol`): a dtype
(``float32``, ``float16``, ``bfloat16``), or a dtype with a packing, ``<dtype>+int8:<N>``, under
which steps of at least N tokens travel int8 blockwise. The client picks it with the
``wire_format=`` option (`WireFormat.parse`); `WireCodec` does one session's client side (what the
chain sends, keeps for replay, and reads back); the node's side is `node/_sessions.py`.

The int8 blockwise packing of hidden states ``x [B, T, D]``, per token:

* its `INT8_OUTLIERS` largest values (by magnitude; ties to the lower index) are carried apart,
  exactly as float16 with their int16 indices (increasing). LLM residual streams hold a few
  huge values (SmolLM2: 21953 in one channel where the median is 2.7); left in a block, one of
  them sets its scale and flattens the other 63 values to a few levels;
* the others (the outliers' places read as 0) are cut into blocks of `INT8_BLOCK` along the
  hidden dim (the last block shorter when D is not a multiple), and each block is sent as
  ``q = round(x / s)`` in int8 with ``s = absmax / 127`` rounded to float16 (upward where
  rounding to nearest went below, so ``|q| <= 127``).

A token's row is its D int8 values, its float16 scales, the outliers' int16 indices, then their
float16 values, as little-endian bytes: one int8 tensor ``[B, T, packed_width(D)]``, about 4x
smaller than float32. It is per token, so any chunking of a sequence packs to the same rows,
and deterministic (exact IEEE arithmetic and an exact top-k). Decoding is exact in float32 (an
int8 times a float16 needs 18 significant bits, float32 has 24; the outliers are float16), so
the client can hand a replacement node, as float32, the very values the original one decoded.
Error per value: at most half its block's scale, about ``absmax / 254`` of the block without the
outliers; an outlier's is float16 rounding. Values that do not pack (not finite, an outlier
beyond float16, or a block absmax above 127 * 65504) are not packed: the step travels in the
session's dtype instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._errors import InvalidOptionError
from .protocol import HIDDEN_DTYPES, INT8_BLOCK, INT8_OUTLIERS, MAX_LENGTH

__all__ = ["WireFormat", "WireCodec", "packed_width", "unpacked_width", "encode_int8", "decode_int8",
           "check_int8", "DEFAULT_INT8_FROM"]

DEFAULT_INT8_FROM = 64  # "int8" alone: steps of at least this many tokens travel packed
_K = INT8_OUTLIERS
_MAX_D = 32767  # outlier indices are int16


# -- the packing ---------------------------------------------------------------------------------
def packed_width(d: int) -> int:
    """The packed row width of hidden size `d` (>= INT8_OUTLIERS): its d int8 values, a 2-byte
    scale per block, and 4 bytes per outlier."""
    return d + 2 * -(-d // INT8_BLOCK) + 4 * _K


def unpacked_width(width: int) -> int | None:
    """The hidden size whose packed rows are `width` wide, or None if no size packs to it."""
    inner = width - 4 * _K
    d = inner - 2 * -(-inner // (INT8_BLOCK + 2))
    return d if d >= _K and packed_width(d) == width else None


def encode_int8(x: torch.Tensor) -> torch.Tensor | None:
    """`x` [B, T, D] (any float dtype or device) packed: int8 [B, T, packed_width(D)] on x's
    device, or None when it does not pack (see the module docstring)."""
    b, t, d = x.shape
    if not _K <= d <= _MAX_D:
        return None
    xf = x.float()
    idx = _top_indices(xf.abs(), _K)                                 # [B, T, K], increasing
    values = xf.gather(-1, idx).to(torch.float16)   # a NaN or inf is among them, or in a block
    if not bool(torch.isfinite(values).all()):
        return None
    blocks = -(-d // INT8_BLOCK)
    rest = xf.scatter(-1, idx, 0.0)
    if blocks * INT8_BLOCK != d:
        rest = F.pad(rest, (0, blocks * INT8_BLOCK - d))
    rest = rest.view(b, t, blocks, INT8_BLOCK)
    absmax = rest.abs().amax(-1)                                     # [B, T, blocks]
    scale = (absmax / 127).to(torch.float16)
    low = scale.float() * 127 < absmax          # rounded below absmax / 127: one float16 step up
    if bool(low.any()):
        scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    if not bool(torch.isfinite(scale).all()):                        # also NaN: NaN < x is False
        return None
    s = scale.float()
    q = (rest / torch.where(s > 0, s, 1.0).unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    q = q.view(b, t, blocks * INT8_BLOCK)[..., :d]
    return torch.cat([q, scale.view(torch.int8), idx.to(torch.int16).view(torch.int8),
                      values.view(torch.int8)], dim=-1)


def _top_indices(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest `magnitudes` of each row, increasing; a tie at the k-th
    place goes to the lower index, so the set never depends on how top-k breaks ties."""
    d = magnitudes.shape[-1]
    top = magnitudes.topk(min(k + 1, d), dim=-1)
    idx = top.indices[..., :k]
    if d > k:
        tied = top.values[..., k - 1] == top.values[..., k]
        if bool(tied.any()):  # rare in real hidden states (a row of zeros, say): those rows exactly
            idx = idx.clone()
            idx[tied] = _exact_top(magnitudes[tied], k)
    return idx.sort(dim=-1).values


def _exact_top(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of rows [N, D] with no ties: the key is the magnitude's float32 bits (ordered as
    non-negative floats are) then the reversed index."""
    d = magnitudes.shape[-1]
    key = magnitudes.float().view(torch.int32).long() * (1 << 16) + (d - 1 - torch.arange(d, device=magnitudes.device))
    return key.topk(k, dim=-1).indices


def check_int8(packed: torch.Tensor, d: int | None = None) -> str | None:
    """Why `packed` is not a valid int8 blockwise tensor of hidden size `d` (None: of any size),
    or None if it is: three dimensions, int8, the packed width, finite non-negative scales,
    increasing outlier indices below d, finite outlier values."""
    if packed.dtype != torch.int8 or packed.dim() != 3:
        return f"packed hidden states must be int8 [B, T, W], got {packed.dtype} {list(packed.shape)}"
    width = packed.shape[-1]
    size = unpacked_width(width)
    if size is None or (d is not None and size != d):
        want = f"hidden size {d} packs to {packed_width(d)}" if d is not None else "no hidden size packs to it"
        return f"packed rows are {width} bytes wide; {want}"
    scales, idx, values = _parts(packed, size)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        return "packed scales must be finite and non-negative"
    if bool((idx < 0).any()) or bool((idx >= size).any()) or bool((idx[..., 1:] <= idx[..., :-1]).any()):
        return f"packed outlier indices must increase, within [0, {size})"
    if not bool(torch.isfinite(values).all()):
        return "packed outlier values must be finite"
    return None


def decode_int8(packed: torch.Tensor, d: int) -> torch.Tensor:
    """The float32 [B, T, d] values of a packed tensor (exact: see the module docstring).
    Raises `ValueError` when `packed` is not a valid packing of hidden size `d`."""
    problem = check_int8(packed, d)
    if problem is not None:
        raise ValueError(problem)
    b, t, _ = packed.shape
    blocks = -(-d // INT8_BLOCK)
    scales, idx, values = _parts(packed, d)
    q = F.pad(packed[..., :d].float(), (0, blocks * INT8_BLOCK - d)).view(b, t, blocks, INT8_BLOCK)
    x = (q * scales.float().unsqueeze(-1)).view(b, t, blocks * INT8_BLOCK)[..., :d].contiguous()
    return x.scatter_(-1, idx.long(), values.float())


def _parts(packed: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scales float16, outlier indices int16, outlier values float16) of a packed tensor."""
    a = d + 2 * -(-d // INT8_BLOCK)
    scales = packed[..., d:a].contiguous().view(torch.float16)
    idx = packed[..., a:a + 2 * _K].contiguous().view(torch.int16)
    values = packed[..., a + 2 * _K:].contiguous().view(torch.float16)
    return scales, idx, values


# -- the client's choice ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WireFormat:
    """A client's wire format (the ``wire_format=`` option): `dtype` None is the client's own
    compute dtype (the default: values travel unchanged); `int8_from` None never packs."""

    dtype: str | None = None
    int8_from: int | None = None

    @classmethod
    def parse(cls, spec: "str | WireFormat | None") -> "WireFormat":
        """None or "model" (the default), "float32", "float16", "bfloat16", "int8" (the model's
        dtype, steps of 64 tokens or more packed), "int8:N", and "<dtype>+int8[:N]"."""
        if spec is None or isinstance(spec, WireFormat):
            return spec or cls()
        if not isinstance(spec, str):
            raise InvalidOptionError(f"wire_format must be a string, got {type(spec).__name__}")
        base, plus, packing = spec.strip().lower().partition("+")
        if not plus and base.split(":")[0] == "int8":
            base, packing = "model", base
        if base not in ("model", *HIDDEN_DTYPES) or (plus and not packing):
            raise InvalidOptionError(_usage(spec))
        int8_from = None
        if packing:
            name, colon, tokens = packing.partition(":")
            if name != "int8" or (colon and not (tokens.isdigit() and 1 <= int(tokens) <= MAX_LENGTH)):
                raise InvalidOptionError(_usage(spec))
            int8_from = int(tokens) if colon else DEFAULT_INT8_FROM
        return cls(None if base == "model" else base, int8_from)

    def session_name(self, compute: torch.dtype) -> str:
        """The name sent in `OpenSession.dtype` by a client computing in `compute`."""
        dtype = self.dtype or str(compute).removeprefix("torch.")
        return dtype if self.int8_from is None else f"{dtype}+int8:{self.int8_from}"


def _usage(spec: object) -> str:
    return (f"wire_format {spec!r} is not one of: model (the default), float32, float16, bfloat16, int8, "
            f"int8:<min tokens>, or <dtype>+int8[:<min tokens>] (e.g. float16+int8:64)")


class WireCodec:
    """One session's client side: what the chain sends (`encode`), keeps for replay and reads
    back (the wire form: a tensor of the wire dtype, or packed int8), and hands the head
    (`decode`). With the default format every call is the identity on the values."""

    def __init__(self, fmt: WireFormat, compute: torch.dtype, hidden_size: int | None = None) -> None:
        self.compute = compute
        self.dtype: torch.dtype = getattr(torch, fmt.dtype) if fmt.dtype else compute  # the plain wire dtype
        self.int8_from = fmt.int8_from
        self.hidden_size = hidden_size
        self.name = fmt.session_name(compute)

    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` [B, T, D] as it travels: packed when T reaches the threshold (and it packs),
        else contiguous in the wire dtype."""
        if self.int8_from is not None and hidden.shape[1] >= self.int8_from:
            packed = encode_int8(hidden)
            if packed is not None:
                return packed
        if hidden.dtype != self.dtype or not hidden.is_contiguous():
            hidden = hidden.to(self.dtype).contiguous()
        return hidden

    def decode(self, wire: torch.Tensor) -> torch.Tensor:
        """A wire-form tensor in the compute dtype."""
        if wire.dtype == torch.int8:
            wire = decode_int8(wire, self._width(wire))
        return wire if wire.dtype == self.compute else wire.to(self.compute)

    def refusal(self, result: torch.Tensor) -> str | None:
        """Why a node's result cannot be taken (None: it can): neither the wire dtype nor a
        valid packing on a session that packs."""
        if result.dtype == self.dtype:
            return None
        if result.dtype != torch.int8 or self.int8_from is None:
            return f"hidden states of dtype {result.dtype}, the session's are {self.dtype}"
        return check_int8(result, self.hidden_size)

    def replay(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Wire-form chunks as one Replay tensor: as they are when none is packed, else all
        decoded to float32 (exact: the values the original node decoded)."""
        if not any(h.dtype == torch.int8 for h in chunks):
            return torch.cat(chunks, dim=1)
        return torch.cat([decode_int8(h, self._width(h)) if h.dtype == torch.int8 else h.float()
                          for h in chunks], dim=1)

    def _width(self, packed: torch.Tensor) -> int:
        return self.hidden_size if self.hidden_size is not None else unpacked_width(packed.shape[-1]) or 0
