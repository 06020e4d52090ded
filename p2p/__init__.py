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
from ._dht import DHT, PeerRecord, provider_key, resolve_dht_mode
from ._errors import (
    EndOfSession,
    ErrorCode,
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
from ._expiring import ExpiringSet
from ._gossip import Gossip, GossipMessage, GossipSubscription
from ._host import Host, HostConfig, PeerCallback, SessionHandler, UnaryHandler, open_host, serve_host
from ._identity import Identity, peer_id_from_public_key, verify_signature
from ._logging import quiet_libp2p_logging
from ._pnet import SwarmKey, SwarmKeyError
from ._nat import NatConfig
from ._reach import ReachStatus, is_public_ip
from ._relay import RelayLimits, is_relayed
from ._messages import REGISTRY, ErrorMessage, Goodbye, Heartbeat, Message, field, message, message_class
from ._protocol import SessionProtocol
from ._session import Session
from ._tensor import DTYPE_SIZES, Tensor
from ._wire import FrameDecoder, decode_body, encode, encode_bytes

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
