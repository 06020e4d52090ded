"""A model's identity: the hash nodes announce and clients match on (`pipeline.model_hash`).

Two checkpoints are one model when they compute one function: the same config and the same
tensors. Hashing every weight byte would prove that, but reads the whole checkpoint: 140 GB for a
70B model, minutes at every node start and on every client. A config.json hash alone is free but
blind to the weights: two fine-tunes of one base share their config.json, and a swarm would mix
their blocks in one generation without a word. The identity sits in between. It is SHA-256 over
a canonical JSON of:

- the config (a Hugging Face config.json, canonical: sorted keys, compact);
- for every tensor of the checkpoint, sorted by name: its name, stored dtype and shape, and a
  SHA-256 of a sample of its stored bytes: the first, the middle and the last run of at most
  `SAMPLE_BYTES` (the whole tensor when it is at most three runs long).

What follows from it:

- **Independent of where and how the tensors are stored**: the path, the file names, the
  sharding and the offsets take no part. A copy, a resharded copy, a hub snapshot and a local
  directory of the same weights are one model.
- **Distinct**: a fine-tune (a full one changes every element of the tensors it trains; a merged
  LoRA changes every element of the matrices it adapts, so every sample of them), a dtype
  conversion (bf16 -> fp16 changes the bytes), another vocabulary or shape, another config.
- **Blind spot**: an edit confined to bytes outside every sampled run (a few rows of a matrix
  changed and nothing else, say new token embeddings trained in place of reserved ones in the
  middle of the table) leaves the identity as it was. Such checkpoints can mix.
- **Cost**: the headers, then three reads of at most 4 KiB per tensor. Llama-70B has 723 tensors
  in 30 shards: about 2,200 small reads (under 9 MB), well under a second from an SSD, where
  reading every byte takes minutes. The result is cached per process (by the files' paths,
  sizes and modification times).
- **What a holder needs**: every shard file of the checkpoint (its header and three runs per
  tensor are read; the tensors themselves are not loaded). A client loads only the embeddings,
  final norm and LM head, but needs the other shards present to name the model; a checkpoint
  with a shard missing is a clear `ModelLoadError` naming it.

GGUF files have their own identity (`pipeline._gguf.GGUFFile.model_hash`), built the same way
from their metadata, tensor table and the same byte sample.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import Any

SAMPLE_BYTES = 4096  # one sampled run of a tensor's bytes (a page)


def byte_runs(nbytes: int) -> list[tuple[int, int]]:
    """(offset, length) of the sampled runs of `nbytes` bytes of data: the first, middle and last
    `SAMPLE_BYTES`, or the whole when that is at most three runs long."""
    if nbytes <= 3 * SAMPLE_BYTES:
        return [(0, nbytes)]
    return [(0, SAMPLE_BYTES), ((nbytes - SAMPLE_BYTES) // 2, SAMPLE_BYTES), (nbytes - SAMPLE_BYTES, SAMPLE_BYTES)]


def element_runs(shape: list[int] | tuple[int, ...], itemsize: int) -> list[tuple[slice, ...]] | None:
    """Index tuples (for safetensors' `get_slice`) that select the sampled runs of a tensor of
    `shape` in row-major order: the first elements of the first row, the middle of the middle
    row, the last elements of the last row, each run at most `SAMPLE_BYTES`. None when the
    tensor is small enough to read whole (at most three runs, or a scalar)."""
    numel = math.prod(shape)
    if not shape or numel * itemsize <= 3 * SAMPLE_BYTES:
        return None
    cols = shape[-1]
    if cols == 0:
        return None
    rows = numel // cols
    k = min(cols, max(1, SAMPLE_BYTES // itemsize))
    runs = []
    for row, col in ((0, 0), (rows // 2, (cols - k) // 2), (rows - 1, cols - k)):
        lead = []
        for size in reversed(shape[:-1]):   # the row's index in each leading dimension
            row, i = divmod(row, size)
            lead.append(i)
        runs.append(tuple(slice(i, i + 1) for i in reversed(lead)) + (slice(col, col + k),))
    return runs


def identity_hash(format_: str, description: dict[str, Any],
                  tensors: Iterable[tuple[str, str, list[int], str]]) -> str:
    """Hex SHA-256 of the canonical JSON of ``{"format": format_, **description, "tensors":
    [[name, dtype, shape, sample digest], ...]}`` with the tensors sorted by name."""
    table = sorted([name, dtype, [int(d) for d in shape], digest] for name, dtype, shape, digest in tensors)
    body = {**description, "format": format_, "tensors": table}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

