"""Persistent ed25519 identities."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import p2p


def test_identity_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    first = p2p.Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = p2p.Identity.load_or_create(path)
    assert again.peer_id == first.peer_id and again.peer_id_str.startswith("12D3KooW")  # ed25519 ids
    assert path.read_bytes() == first.private_key_bytes()
    assert not list(path.parent.glob(".*.tmp"))


@pytest.mark.slow  # two Python processes, each importing py-libp2p
def test_same_peer_id_after_a_process_restart(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    code = "import sys, p2p; print(p2p.Identity.load_or_create(sys.argv[1]).peer_id_str)"
    ids = {subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(ids) == 1 and p2p.Identity.load_or_create(path).peer_id_str == ids.pop().strip()


def test_corrupt_or_foreign_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="not a libp2p private key"):
        p2p.Identity.load_or_create(path)


def test_generate_is_deterministic_with_a_seed() -> None:
    a, b = p2p.Identity.generate(b"\x01" * 32), p2p.Identity.generate(b"\x01" * 32)
    assert a.peer_id == b.peer_id != p2p.Identity.generate().peer_id
    with pytest.raises(p2p.LocalProtocolError):
        p2p.Identity.generate(b"short")


def test_sign_and_verify_with_public_key_bytes() -> None:
    ident = p2p.Identity.generate()
    sig = ident.sign(b"hello")
    assert p2p.verify_signature(ident.public_key_bytes, b"hello", sig)
    assert not p2p.verify_signature(ident.public_key_bytes, b"hellO", sig)
    assert not p2p.verify_signature(b"garbage", b"hello", sig)
    assert p2p.peer_id_from_public_key(ident.public_key_bytes) == ident.peer_id


def test_group_readable_key_file_still_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "node.key"
    ident = p2p.Identity.load_or_create(path)
    os.chmod(path, 0o644)
    assert p2p.Identity.load_or_create(path).peer_id == ident.peer_id
    assert "readable by others" in caplog.text
