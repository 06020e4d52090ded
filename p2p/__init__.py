"""lamina's network layer: py-libp2p (TCP + Noise + yamux) on trio, made safe and framed.

Layers, bottom up:

* sans-IO wire format (`encode`, `FrameDecoder`, `SessionProtocol`): length-prefixed frames of
  a msgpack header and raw little-endian tensor payload; typed, validated `Message` classes
  registered with `@message`; no sockets, nothing unpickled;
* `Session`: a framed, heartbeated, deadline-bounded message stream over one transport (a
  libp2p stream, or a direct lane: the session behaves the same on either);
* `open_host(HostConfig)`: the host, its handlers (isolated, per-peer limited), the Kademlia
  `DHT` and `Gossip`, all owned by one async context manager; with ``HostConfig(swarm_key=
  SwarmKey.load("swarm.key"))`` a private swarm (libp2p pnet: only peers holding the key connect).

Quick tour::

    @p2p.message("demo.echo")
    @dataclass(frozen=True)
    class Echo(p2p.Message):
        text: str = p2p.field(max_len=1000)
        tensor: p2p.Tensor | None = None

    async with p2p.open_host(p2p.HostConfig(identity=p2p.Identity.generate())) as host:
        host.set_unary_handler("/demo/echo/1", handle_echo)
        reply = await host.request(peer_id, "/demo/echo/1", Echo("hi"))
        async with host.open_session(peer_id, "/demo/stream/1") as session:
            await session.send(Echo("a"))
            reply = await session.receive()

Errors are named by meaning (see `p2p._errors`): `LocalProtocolError` / `RemoteProtocolError`,
`PeerBrokenError`, `PeerTimeoutError` / `PeerFrozenError`, `RemoteError(code, message)`.
Network-level constants (deadlines, heartbeat, frame size) live in `p2p.constants`.
"""

from . import _constants as constants
from ._errors import (
    EndOfSession,
    ErrorCode,
    LaminaError,
    LocalProtocolError,
    P2PError,
    PeerBrokenError,
    PeerError,
    PeerFrozenError,
    PeerTimeoutError,
    ProtocolError,
    ReceiveInterrupted,
    RemoteError,
    RemoteProtocolError,
    UnsupportedProtocolError,
)

# Everything else loads on first use: the host pulls in py-libp2p (about 1.5 s to import), and
# `pipeline`'s engine imports this package only for the error classes above (`LaminaError`).
_LAZY = {
    "._dht": ("DHT", "PeerRecord", "provider_key", "resolve_dht_mode"),
    "._expiring": ("ExpiringSet",),
    "._gossip": ("Gossip", "GossipMessage", "GossipSubscription"),
    "._host": ("Host", "HostConfig", "PeerCallback", "SessionHandler", "UnaryHandler", "open_host", "serve_host"),
    "._identity": ("Identity", "peer_id_from_public_key", "verify_signature"),
    "._logging": ("quiet_libp2p_logging",),
    "._pnet": ("SwarmKey", "SwarmKeyError"),
    "._nat": ("NatConfig",),
    "._reach": ("ReachStatus", "is_public_ip"),
    "._relay": ("RelayLimits", "is_relayed"),
    "._messages": ("REGISTRY", "ErrorMessage", "Goodbye", "Heartbeat", "Message", "field", "message",
                   "message_class"),
    "._protocol": ("SessionProtocol",),
    "._session": ("Session",),
    "._tensor": ("DTYPE_SIZES", "Tensor"),
    "._wire": ("FrameDecoder", "decode_body", "encode", "encode_bytes"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'p2p' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value   # later lookups are plain attribute reads (hot paths use p2p.Tensor)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

__all__ = [
    "constants",
    # identity and host
    "Identity",
    "SwarmKey",
    "SwarmKeyError",
    # NAT traversal
    "NatConfig",
    "RelayLimits",
    "ReachStatus",
    "is_public_ip",
    "is_relayed",
    "verify_signature",
    "peer_id_from_public_key",
    "HostConfig",
    "Host",
    "open_host",
    "serve_host",
    "UnaryHandler",
    "SessionHandler",
    "PeerCallback",
    "Session",
    "ExpiringSet",
    # messages and wire format
    "Message",
    "message",
    "field",
    "message_class",
    "REGISTRY",
    "ErrorMessage",
    "Heartbeat",
    "Goodbye",
    "Tensor",
    "DTYPE_SIZES",
    "encode",
    "encode_bytes",
    "decode_body",
    "FrameDecoder",
    "SessionProtocol",
    # DHT and gossip
    "DHT",
    "PeerRecord",
    "provider_key",
    "resolve_dht_mode",
    "Gossip",
    "GossipMessage",
    "GossipSubscription",
    # errors
    "LaminaError",
    "P2PError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "PeerError",
    "PeerBrokenError",
    "PeerTimeoutError",
    "PeerFrozenError",
    "UnsupportedProtocolError",
    "EndOfSession",
    "ReceiveInterrupted",
    "RemoteError",
    "ErrorCode",
    "quiet_libp2p_logging",
]
