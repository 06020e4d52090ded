"""Private swarms (p2p/_pnet.py): the XSalsa20 cipher against NaCl's published vectors, the
swarm.key format, the protected connection sans sockets, and real hosts on loopback: the same
key connects, another key or none fails at once with a clear error, an outsider learns nothing
of the swarm, lanes need the key too; and one real `run-node --swarm-key` with clients."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio
import trio.testing

import crdt
import p2p
from _wait import eventually
from p2p import _lane, _pnet
from p2p._constants import DIAL_DEADLINE, PNET_HANDSHAKE_DEADLINE
from p2p._pnet import MULTISTREAM_HEADER, NONCE_SIZE, PnetHandshakeError, SwarmKey, SwarmKeyError

# NaCl's tests/stream3.c and stream.c (libsodium's test/default/stream*.c): XSalsa20 with this
# key and nonce; the first 32 bytes of the keystream, and the SHA-256 of its first 4 MiB.
VECTOR_KEY = bytes.fromhex("1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389")
VECTOR_NONCE = bytes.fromhex("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37")
VECTOR_STREAM = bytes.fromhex("eea6a7251c1e72916d11c2cb214d3c252539121d8e234e652d651fa4c8cff880")
VECTOR_4MIB_SHA256 = "662b9d0e3463029156069b12f918691a98f7dfb2ca0393c96bbfc6b1fbd630a2"
FAST = 2.0  # a rejected handshake must fail well within this (a timeout would take DIAL_DEADLINE)
PROTO = "/test/pnet-echo/1"


# --- XSalsa20 ---------------------------------------------------------------------------------------
def test_xsalsa20_matches_nacls_published_vectors() -> None:
    assert _pnet.xsalsa20(VECTOR_KEY, VECTOR_NONCE).encrypt(bytes(32)) == VECTOR_STREAM
    stream = _pnet.xsalsa20(VECTOR_KEY, VECTOR_NONCE)
    # in uneven pieces: the cipher object keeps its place in the keystream
    pieces = [stream.encrypt(bytes(n)) for n in (1, 63, 64, 1000, 4 * 1024 * 1024 - 1128)]
    assert hashlib.sha256(b"".join(pieces)).hexdigest() == VECTOR_4MIB_SHA256


def test_xsalsa20_matches_libsodium_when_present() -> None:
    name = ctypes.util.find_library("sodium")
    if name is None:
        pytest.skip("no libsodium on this machine")
    sodium = ctypes.CDLL(name)
    assert sodium.sodium_init() >= 0
    for size in (1, 100, 4096 + 7):
        key, nonce, msg = os.urandom(32), os.urandom(24), os.urandom(size)
        out = ctypes.create_string_buffer(size)
        assert sodium.crypto_stream_xsalsa20_xor(out, msg, ctypes.c_ulonglong(size), nonce, key) == 0
        assert _pnet.xsalsa20(key, nonce).encrypt(msg) == out.raw


# --- swarm.key ---------------------------------------------------------------------------------------
def test_swarm_key_round_trips_and_reads_every_encoding() -> None:
    key = SwarmKey.generate()
    text = key.to_text()
    assert text == f"/key/swarm/psk/1.0.0/\n/base16/\n{key.key.hex()}\n"
    assert SwarmKey.parse(text) == key and SwarmKey.parse(text.encode()) == key
    assert SwarmKey.parse(text.replace("\n", "\r\n")) == key
    import base64

    raw = key.key
    assert SwarmKey.parse(f"/key/swarm/psk/1.0.0/\n/base64/\n{base64.b64encode(raw).decode()}") == key
    assert SwarmKey.parse(f"/key/swarm/psk/1.0.0/\n/base32/\n{base64.b32encode(raw).decode()}") == key
    assert SwarmKey.parse(b"/key/swarm/psk/1.0.0/\n/bin/\n" + raw) == key
    assert key.hex == raw.hex() and len(key.fingerprint()) == 8
    assert key.fingerprint() == hashlib.sha256(raw).hexdigest()[:8]
    assert raw.hex() not in repr(key) and key.fingerprint() in repr(key)
    assert SwarmKey.generate() != key
    with pytest.raises(AttributeError):
        key.key = b"x" * 32  # type: ignore[misc]


@pytest.mark.parametrize("text, message", [
    ("", "first line must be /key/swarm/psk/1.0.0/"),
    ("/key/swarm/psk/2.0.0/\n/base16/\n" + "00" * 32, "first line must be /key/swarm/psk/1.0.0/"),
    ("/key/swarm/psk/1.0.0/\n/base58/\n" + "00" * 32, "must be /base16/, /base64/, /base32/ or /bin/"),
    ("/key/swarm/psk/1.0.0/\n/base16/\n" + "00" * 31, "holds 32 bytes .64 hex digits., this one 31"),
    ("/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32, "does not decode"),
    ("/key/swarm/psk/1.0.0/\n/base64/\n!!!", "does not decode"),
    ("/key/swarm/psk/1.0.0/\n/bin/\nshort", "this one 5"),
])
def test_a_bad_swarm_key_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SwarmKeyError, match=message) as info:
        SwarmKey.parse(text)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_loading_a_swarm_key_file(tmp_path: Path, caplog) -> None:
    key = SwarmKey.generate()
    path = tmp_path / "swarm.key"
    path.write_text(key.to_text())
    path.chmod(0o600)
    assert SwarmKey.load(path) == key
    assert "readable by others" not in caplog.text
    path.chmod(0o644)
    assert SwarmKey.load(str(path)) == key
    assert "readable by others" in caplog.text
    with pytest.raises(SwarmKeyError, match=r"swarm key file .*missing.key does not exist; create one with"):
        SwarmKey.load(tmp_path / "missing.key")
    with pytest.raises(SwarmKeyError, match="is a directory"):
        SwarmKey.load(tmp_path)
    (tmp_path / "bad.key").write_text("hello\n")
    with pytest.raises(SwarmKeyError, match=r"bad.key is not a valid swarm key: a swarm key's first line"):
        SwarmKey.load(tmp_path / "bad.key")
    if os.geteuid() != 0:  # root reads anything
        path.chmod(0)
        with pytest.raises(SwarmKeyError, match="cannot read swarm key file"):
            SwarmKey.load(path)


def test_the_key_generator_writes_a_private_file_and_never_overwrites(tmp_path: Path, capsys) -> None:
    from p2p import swarmkey

    out = tmp_path / "swarm.key"
    assert swarmkey.main(["--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = SwarmKey.load(out)
    assert key.fingerprint() in capsys.readouterr().err
    assert swarmkey.main(["--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and SwarmKey.load(out) == key
    assert swarmkey.main(["--out", str(out), "--force"]) == 0 and SwarmKey.load(out) != key
    assert swarmkey.main([]) == 0
    assert SwarmKey.parse(capsys.readouterr().out)


# --- the protected connection, sans sockets ------------------------------------------------------
class MemoryConn:
    """The raw-connection interface over one end of a trio in-memory stream pair."""

    def __init__(self, stream: trio.abc.Stream, initiator: bool) -> None:
        self.stream, self.is_initiator = stream, initiator

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read(self, n: int | None = None) -> bytes:
        return await self.stream.receive_some(n)

    async def close(self) -> None:
        await self.stream.aclose()

    def get_remote_address(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def get_transport_addresses(self) -> list:
        return []

    def get_connection_type(self) -> str:
        return "direct"


def _raw_pair() -> tuple[MemoryConn, MemoryConn]:
    a, b = trio.testing.memory_stream_pair()
    return MemoryConn(a, True), MemoryConn(b, False)


async def _read_exactly(conn, n: int) -> bytes:  # type: ignore[no-untyped-def]
    out = b""
    while len(out) < n:
        chunk = await conn.read(n - len(out))
        assert chunk
        out += chunk
    return out


async def test_the_wire_is_nonce_then_xsalsa20_and_both_ways_decrypt() -> None:
    key = SwarmKey.generate()
    raw_a, raw_b = _raw_pair()
    a, b = _pnet.protect(raw_a, key.hex), _pnet.protect(raw_b, key.hex)
    message = MULTISTREAM_HEADER + b"hello" * 100
    await a.write(message[:7])
    await a.write(message[7:])
    wire = await _read_exactly(raw_b, NONCE_SIZE + len(message))  # what the peer sees
    nonce, body = wire[:NONCE_SIZE], wire[NONCE_SIZE:]
    assert _pnet.xsalsa20(key.key, nonce).decrypt(body) == message
    # both ways: each side decrypts what the other sends
    raw_a2, raw_b2 = _raw_pair()
    a2, b2 = _pnet.protect(raw_a2, key.hex), _pnet.protect(raw_b2, key.hex)
    await a2.write(message)
    await b2.write(MULTISTREAM_HEADER)
    assert await _read_exactly(b2, len(message)) == message
    assert await _read_exactly(a2, len(MULTISTREAM_HEADER)) == MULTISTREAM_HEADER


async def test_a_nonce_in_pieces_and_each_rejection_reason() -> None:
    key, other = SwarmKey.generate(), SwarmKey.generate()
    # the nonce and the header, one byte at a time
    raw_a, raw_b = _raw_pair()
    b = _pnet.protect(raw_b, key.hex)
    nonce = os.urandom(NONCE_SIZE)
    wire = nonce + _pnet.xsalsa20(key.key, nonce).encrypt(MULTISTREAM_HEADER)
    async with trio.open_nursery() as nursery:
        async def drip() -> None:
            for i in range(len(wire)):
                await raw_a.write(wire[i:i + 1])
        nursery.start_soon(drip)
        assert await _read_exactly(b, len(MULTISTREAM_HEADER)) == MULTISTREAM_HEADER
    # another key: the first decrypted byte is wrong (or one of the next 19)
    raw_a, raw_b = _raw_pair()
    b = _pnet.protect(raw_b, key.hex)
    await _pnet.protect(raw_a, other.hex).write(MULTISTREAM_HEADER)
    with pytest.raises(PnetHandshakeError, match="another one") as info:
        await _read_exactly(b, len(MULTISTREAM_HEADER))
    assert info.value.reason == "mismatch"
    # no key: multistream's header in clear, even though it is shorter than a nonce
    raw_a, raw_b = _raw_pair()
    b = _pnet.protect(raw_b, key.hex)
    await raw_a.write(MULTISTREAM_HEADER)
    with pytest.raises(PnetHandshakeError, match="no swarm key") as info:
        await b.read(1)
    assert info.value.reason == "no_key"
    # the peer hangs up mid-nonce
    raw_a, raw_b = _raw_pair()
    b = _pnet.protect(raw_b, key.hex)
    await raw_a.write(b"\x01\x02\x03")
    await raw_a.close()
    with pytest.raises(PnetHandshakeError) as info:
        await b.read(1)
    assert info.value.reason == "closed"


@pytest.mark.parametrize("sent", [0, NONCE_SIZE - 1, NONCE_SIZE + 5], ids=["nothing", "part-nonce", "part-header"])
async def test_a_peer_that_stalls_in_the_handshake_times_out(autojump_clock, sent: int) -> None:
    key = SwarmKey.generate()
    raw_a, raw_b = _raw_pair()
    b = _pnet.protect(raw_b, key.hex)
    nonce = os.urandom(NONCE_SIZE)
    await raw_a.write((nonce + _pnet.xsalsa20(key.key, nonce).encrypt(MULTISTREAM_HEADER))[:sent])
    start = trio.current_time()
    with pytest.raises(PnetHandshakeError) as info:
        while True:  # multistream reads the header in pieces: each piece has the same deadline
            await b.read(1)
    assert info.value.reason == "timeout"
    assert trio.current_time() - start == pytest.approx(PNET_HANDSHAKE_DEADLINE)


def test_protect_checks_the_key() -> None:
    raw_a, _ = _raw_pair()
    for bad in ("00" * 31, "zz" * 32, ""):
        with pytest.raises(SwarmKeyError):
            _pnet.protect(raw_a, bad)


# --- real hosts on loopback -----------------------------------------------------------------------
async def echo(peer: object, request: p2p.Message) -> p2p.Message:
    return request


async def test_hosts_with_the_same_key_connect_and_talk(make_host) -> None:
    from test_p2p_host import Echo

    key = SwarmKey.generate()
    client, server = await make_host(swarm_key=key), await make_host(swarm_key=key)
    server.set_unary_handler(PROTO, echo)
    await client.connect(server.addrs()[0])
    t = torch.randn(4, 64)
    reply = await client.request(server.peer_id, PROTO, Echo("private", p2p.Tensor.from_torch(t)))
    assert reply.text == "private" and torch.equal(reply.tensor.to_torch(), t)
    # the connection really is protected: under yamux and Noise, its raw connection is ours
    conn = client.libp2p.get_network().get_connections(server.peer_id)[0]
    assert any(isinstance(layer, _pnet.ProtectedConnection) for layer in _layers(conn))


def _layers(conn: object, depth: int = 8) -> list[object]:
    """The objects under a py-libp2p connection (muxer, secure session, Noise framing, raw)."""
    found = [conn]
    for name in ("muxed_conn", "secured_conn", "conn", "read_writer", "read_write_closer"):
        inner = getattr(conn, name, None)
        if inner is not None and depth:
            return found + _layers(inner, depth - 1)
    return found


CHECK = "check that every peer uses the same --swarm-key"


@pytest.mark.parametrize("client_key, server_key, sentence", [
    ("a", "b", f"it uses another swarm key; {CHECK}"),
    ("a", None, f"it has no swarm key, so it is not in this private swarm; {CHECK}"),
    (None, "a", f"the handshake failed; if this is a private swarm, {CHECK}"),
], ids=["another-key", "server-has-none", "client-has-none"])
async def test_a_key_mismatch_fails_at_once_with_a_clear_error(make_host, client_key, server_key, sentence) -> None:
    keys = {"a": SwarmKey.generate(), "b": SwarmKey.generate(), None: None}
    client, server = await make_host(swarm_key=keys[client_key]), await make_host(swarm_key=keys[server_key])
    server.set_unary_handler(PROTO, echo)
    start = trio.current_time()
    with pytest.raises(p2p.PeerBrokenError) as info:
        await client.connect(server.addrs()[0])
    elapsed = trio.current_time() - start
    assert str(info.value) == f"cannot connect to {server.peer_id}: {sentence}"
    assert elapsed < FAST < DIAL_DEADLINE, f"rejected after {elapsed:.3f} s"
    assert not client.connected_peers()
    await eventually(lambda: not server.connected_peers())
    # the server is unharmed: a peer with its key still gets in
    friend = await make_host(swarm_key=keys[server_key])
    await friend.connect(server.addrs()[0])


async def test_an_unreachable_peer_of_an_open_swarm_says_nothing_of_keys(make_host) -> None:
    client = await make_host()
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    other = p2p.Identity.generate().peer_id_str
    with pytest.raises(p2p.PeerBrokenError) as info:
        await client.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{other}")
    assert "swarm-key" not in str(info.value)


async def test_lanes_work_in_a_private_swarm(make_host) -> None:
    from test_p2p_lanes import Echo as LaneEcho, _round_trips

    key = SwarmKey.generate()
    client, server = await make_host(swarm_key=key), await make_host(swarm_key=key)
    await client.connect(server.addrs()[0])
    handler = LaneEcho()
    server.set_session_handler(PROTO, handler, lane=True)
    async with client.open_session(server.peer_id, PROTO, lane=True) as session:
        assert session.transport == "lane"
        await _round_trips(session)
    assert handler.transports == ["lane"]


async def test_a_lane_needs_the_swarm_key(nursery) -> None:
    key = SwarmKey.generate().key
    assert _lane._keys(b"k" * 32, b"t" * 16, key) != _lane._keys(b"k" * 32, b"t" * 16)
    assert _lane._keys(b"k" * 32, b"t" * 16, key) != _lane._keys(b"k" * 32, b"t" * 16, SwarmKey.generate().key)
    listener = _lane.LaneListener("127.0.0.1", 0, swarm_key=key)
    await nursery.start(listener.serve)
    for wrong in (None, SwarmKey.generate().key):
        invite, refused = listener.invite()
        with pytest.raises(trio.BrokenResourceError, match="authentication"):
            await _lane.connect_lane("127.0.0.1", invite, wrong)
        await refused.arrived.wait()
        await refused.stream.reset()
    invite, ticket = listener.invite()
    lane = await _lane.connect_lane("127.0.0.1", invite, key)
    await ticket.arrived.wait()
    await lane.write(b"ping")
    assert await ticket.stream.read() == b"ping"
    await lane.reset()
    await ticket.stream.reset()


async def test_an_outsider_learns_nothing_of_a_private_swarm(nursery) -> None:
    """Two nodes of a private swarm announce records; an outsider (no key, then another key)
    with the node's gossip topics, a DHT and a `SwarmView` bootstraps from one of them: it
    connects to nobody and its replica stays empty, while an insider's fills."""
    from node._announce import Announcer, signer_for
    from pipeline._swarm import SwarmView, swarm_topics

    key = SwarmKey.generate()
    model = crdt.ModelId.from_config("tiny", {"num_hidden_layers": 4})

    async def peer(boot: list[str], swarm_key: SwarmKey | None, span: tuple[int, int] | None,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                                bootstrap_peers=boot, gossip_topics=swarm_topics(), swarm_key=swarm_key)
        async with p2p.open_host(config) as host, trio.open_nursery() as inner:
            view = SwarmView(host)
            await inner.start(view.serve)
            if span is not None:
                fields = lambda: dict(model=model, start=span[0], end=span[1], throughput=10.0)  # noqa: E731
                await inner.start(Announcer(view, signer_for(host.identity), fields, heartbeat=0.5).serve)
            task_status.started((host, view))
            await trio.sleep_forever()

    first, first_view = await nursery.start(peer, [], key, (0, 2))
    boot = [first.addrs()[0]]
    second, _ = await nursery.start(peer, boot, key, (2, 4))
    outsiders = [await nursery.start(peer, boot, None, None),
                 await nursery.start(peer, boot, SwarmKey.generate(), None)]
    insider, insider_view = await nursery.start(peer, boot, key, None)
    pids = {first.peer_id.to_bytes(), second.peer_id.to_bytes()}
    with trio.fail_after(20):
        await insider_view.wait_until(lambda state: all(p in state for p in pids))
        await first_view.wait_until(lambda state: all(p in state for p in pids))
    for host, view in outsiders:
        assert not host.connected_peers() and len(view.state) == 0
        assert all("swarm-key" in str(e) for e in host.bootstrap_errors.values()) and host.bootstrap_errors
        assert host.peer_id not in first.connected_peers() and host.peer_id not in second.connected_peers()


async def test_a_client_without_the_key_gets_swarm_unavailable(make_host, micro_model, monkeypatch) -> None:
    from pipeline import AsyncDistributedModelForCausalLM, SwarmUnavailableError

    monkeypatch.delenv("LAMINA_SWARM_KEY", raising=False)
    key = SwarmKey.generate()
    node = await make_host(swarm_key=key)
    for client_key, sentence in ((None, "the handshake failed; if this is a private swarm"),
                                 (SwarmKey.generate(), "it uses another swarm key")):
        start = trio.current_time()
        with pytest.raises(SwarmUnavailableError, match=f"could not reach any of initial_peers .*{sentence}"):
            async with AsyncDistributedModelForCausalLM.from_pretrained(
                    micro_model, initial_peers=node.addrs()[:1], swarm_key=client_key):
                pass
        assert trio.current_time() - start < 10
    with pytest.raises(SwarmKeyError, match="does not exist"):
        async with AsyncDistributedModelForCausalLM.from_pretrained(
                micro_model, initial_peers=node.addrs()[:1], swarm_key="/nonexistent/swarm.key"):
            pass


# --- real run-node processes ------------------------------------------------------------------------
def _run_node_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node._cli", *args], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "LAMINA_SWARM_KEY"})


@pytest.mark.slow
def test_run_node_refuses_a_missing_or_bad_key_file_in_one_line(tmp_path: Path, micro_model) -> None:
    (tmp_path / "bad.key").write_text("/key/swarm/psk/1.0.0/\n/base16/\nabcd\n")
    for path, message in ((tmp_path / "none.key", "does not exist"), (tmp_path / "bad.key", "this one 2")):
        done = _run_node_cli("--model", str(micro_model), "--blocks", "0:4", "--new-swarm", "--swarm-key", str(path))
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("run-node: error: --swarm-key: ") and message in lines[0]


@pytest.mark.slow
async def test_a_private_run_node_serves_only_clients_with_its_key(micro_model, tmp_path, monkeypatch) -> None:
    from test_node_cli import run_node

    from pipeline import AsyncDistributedModelForCausalLM, LocalModelForCausalLM, SwarmUnavailableError

    monkeypatch.delenv("LAMINA_SWARM_KEY", raising=False)
    key_file = tmp_path / "swarm.key"
    from p2p.swarmkey import write_key_file

    write_key_file(str(key_file), SwarmKey.generate())
    local = LocalModelForCausalLM.from_pretrained(micro_model)
    prompt = torch.randint(0, local.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    expected = local.generate(prompt, max_new_tokens=12, eos_token_id=[])
    async with run_node(micro_model, tmp_path, "private", "--blocks", "0:4", "--new-swarm",
                        "--swarm-key", str(key_file)) as node:
        async with AsyncDistributedModelForCausalLM.from_pretrained(
                micro_model, initial_peers=[node.loopback], swarm_key=key_file) as model:
            assert torch.equal(await model.generate(prompt, max_new_tokens=12, eos_token_id=[]), expected)
        monkeypatch.setenv("LAMINA_SWARM_KEY", str(key_file))  # the fallback when none is given
        async with AsyncDistributedModelForCausalLM.from_pretrained(micro_model, initial_peers=[node.loopback]) as model:
            assert torch.equal(await model.generate(prompt, max_new_tokens=12, eos_token_id=[]), expected)
        monkeypatch.delenv("LAMINA_SWARM_KEY")
        for wrong in (None, SwarmKey.generate()):
            with pytest.raises(SwarmUnavailableError, match="same --swarm-key"):
                async with AsyncDistributedModelForCausalLM.from_pretrained(
                        micro_model, initial_peers=[node.loopback], swarm_key=wrong):
                    pass
        assert "private swarm: swarm key" in node.log.read_text()


def test_protecting_twice_is_protecting_once() -> None:
    """py-libp2p's hole-punch dial protects a connection, then its inbound upgrade protects it
    again: the second must hand back the same connection, or our side encrypts twice."""
    from p2p._pnet import protect

    key = p2p.SwarmKey.generate()

    class Raw:
        is_initiator = True

    once = protect(Raw(), key.hex)
    assert protect(once, key.hex) is once
