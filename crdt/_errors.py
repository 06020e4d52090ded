"""Structured validation errors and rejection reasons.

Every record that a replica refuses is refused for a named reason, so the node can log it, count
it per sending peer, and tests can assert the exact outcome. Nothing is dropped silently.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RejectReason(str, enum.Enum):
    """Why a record or message was refused."""

    MALFORMED = "malformed"  # bad structure, types, ranges, or a non-canonical encoding
    OVERSIZED = "oversized"  # over a byte or count limit
    BAD_SIGNATURE = "bad_signature"  # signature does not verify under the enclosed key
    PEER_ID_MISMATCH = "peer_id_mismatch"  # record's peer id is not the enclosed key's peer id
    EXPIRED = "expired"  # lease expiry is not after `now`
    FUTURE = "future"  # hlc wall time is beyond `now + max_skew`
    LEASE_TOO_LONG = "lease_too_long"  # expiry is more than `max_lease` after the record's hlc


@dataclass(frozen=True, slots=True)
class Rejection:
    """One refused record: the reason, the claimed peer id (if it could be read), and a detail."""

    reason: RejectReason
    peer_id: bytes | None
    detail: str


class ValidationError(ValueError):
    """Invalid input (a record, a message, or a remote clock reading), with a structured reason."""

    def __init__(self, reason: RejectReason, detail: str, peer_id: bytes | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.peer_id = peer_id

    def rejection(self) -> Rejection:
        return Rejection(self.reason, self.peer_id, self.detail)
