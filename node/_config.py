"""`NodeConfig`: everything a node needs, in one validated dataclass (the CLI builds one)."""

from __future__ import annotations

import math
import os
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # p2p imports py-libp2p: not for `run-node --help`
    from p2p import SwarmKey

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/0"
DEFAULT_MAX_SESSIONS = 128
# Per-peer limits (issue 21): one peer may hold at most this share of the session slots and of
# the KV cache (but always one session of the longest length taken), and open at most
# DEFAULT_SESSION_OPEN_RATE sessions a second (bursts of its session limit)
PEER_SHARE = 0.5
DEFAULT_SESSION_OPEN_RATE = 20.0
DEFAULT_MAX_CONNECTIONS = 300  # libp2p connections at once (p2p.constants.MAX_CONNECTIONS)
DEFAULT_HEARTBEAT = 10.0  # seconds between announcements of our record
DEFAULT_SESSION_IDLE_TIMEOUT = 120.0  # a session with no step for this long is closed
DEFAULT_DRAIN_TIMEOUT = 60.0  # on SIGTERM, running sessions get this long to finish
DEFAULT_REBALANCE_INTERVAL = 600.0  # how often a --num-blocks node checks for a weaker span
DEFAULT_JOIN_WAIT = 10.0  # how long a --num-blocks node waits to learn the swarm before choosing
MAX_LEASE = 600.0  # seconds: crdt.DEFAULT_MAX_LEASE_MS (records with longer leases are refused)
DEFAULT_LEASE_HEARTBEATS = 4  # node._announce.Announcer.LEASE_HEARTBEATS
DEVICES = ("auto", "cpu", "cuda", "mps")  # auto: cuda, else mps, else cpu (node._node.auto_device)
DTYPES = ("auto", "float32", "bfloat16", "float16")
SWARM_KEY_ENV = "LAMINA_SWARM_KEY"  # path of the swarm key file when --swarm-key is not given


try:
    VERSION = metadata.version("lamina")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    VERSION = "0.0.0"


def default_cache_dir() -> Path:
    """Where measured throughputs are kept: $LAMINA_CACHE or ~/.cache/lamina."""
    env = os.environ.get("LAMINA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lamina"


@dataclass
class NodeConfig:
    """One node. Exactly one of `blocks` / `num_blocks`; `new_swarm` or `initial_peers`."""

    model: str
    blocks: tuple[int, int] | None = None
    num_blocks: int | None = None
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    announce_addrs: list[str] = field(default_factory=list)
    lanes: bool = True  # offer direct lanes to sessions (p2p._lane)
    lane_port: int = 0  # 0: any free port
    new_swarm: bool = False
    initial_peers: list[str] = field(default_factory=list)
    identity: Path | None = None  # key file (created if missing); None: a fresh identity per run
    swarm_key: "SwarmKey | None" = None  # a private swarm's key (p2p.SwarmKey); None: an open swarm
    # NAT traversal (p2p._nat): offer circuit relay v2 to others, with these limits
    relay: bool = True
    relay_slots: int = 128           # reservations held for peers behind NATs
    relay_circuits: int = 512        # circuits relayed at once
    relay_duration: float = 3600.0   # seconds a relayed circuit may last (0: no cap)
    relay_bytes: int = 1 << 30       # bytes per relayed circuit and direction (0: no cap)
    reachability: str = "auto"       # "auto" (dial-back checks), or forced "direct" / "relayed"
    device: str = "auto"
    dtype: str = "auto"
    public_name: str = ""
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_sessions_per_peer: int | None = None  # None: PEER_SHARE of max_sessions (at least 1)
    max_cache_tokens_per_peer: int | None = None  # None: PEER_SHARE of the KV budget (>= one longest session)
    session_open_rate: float = DEFAULT_SESSION_OPEN_RATE  # new sessions per peer and second
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_batch_size: int | None = None  # sessions' steps per forward pass (None: as many as fit)
    inference_max_length: int | None = None  # longest session (max_length) taken (None: the KV budget decides)
    cache_tokens: int | None = None  # None: half of the device's free memory
    num_threads: int | None = None  # torch intra-op threads (None: torch's choice)
    heartbeat: float = DEFAULT_HEARTBEAT
    lease: float | None = None  # None: the announcer's default (a few heartbeats)
    session_idle_timeout: float = DEFAULT_SESSION_IDLE_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    rebalance_interval: float = DEFAULT_REBALANCE_INTERVAL  # 0: never rebalance
    join_wait: float = DEFAULT_JOIN_WAIT
    cache_dir: Path = field(default_factory=default_cache_dir)
    http_port: int | None = None  # serve the map, /metrics and the OpenAI API here (0: any free port)
    http_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        if self.identity is not None:
            self.identity = Path(self.identity).expanduser()
        if self.blocks is not None:
            self.blocks = (int(self.blocks[0]), int(self.blocks[1]))
        if not self.model:
            raise ValueError("--model is required")
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of --blocks A:B and --num-blocks N")
        if self.blocks is not None:
            a, b = self.blocks
            if not 0 <= a < b:
                raise ValueError(f"--blocks {a}:{b} is not a non-empty range A:B with 0 <= A < B")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("--num-blocks must be >= 1")
        if self.new_swarm and self.initial_peers:
            raise ValueError("--new-swarm starts a swarm alone: it takes no --initial-peers")
        if not self.new_swarm and not self.initial_peers:
            raise ValueError("give --initial-peers MULTIADDR ... to join a swarm, or --new-swarm to start one")
        if not self.listen:
            raise ValueError("--listen needs at least one multiaddr")
        if self.relay_slots < 1 or self.relay_circuits < 1 or self.relay_bytes < 0 or not self.relay_duration >= 0:
            raise ValueError("--relay-slots and --relay-circuits must be >= 1, --relay-duration and --relay-bytes >= 0")
        if self.reachability not in ("auto", "direct", "relayed"):
            raise ValueError("--reachability must be auto, direct or relayed")
        if self.http_port is not None and (type(self.http_port) is not int or not 0 <= self.http_port <= 65535):
            raise ValueError(f"--http-port must be a TCP port (0-65535), got {self.http_port}")
        if not self.http_host or any(c.isspace() for c in self.http_host):
            raise ValueError(f"--http-host must be a host name or address, got {self.http_host!r}")
        if not 0 <= self.lane_port <= 65535:
            raise ValueError(f"--lane-port must be a TCP port (0-65535), got {self.lane_port}")
        if self.device != "auto" and self.device.split(":")[0] not in DEVICES[1:]:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N)")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
        if len(self.public_name.encode()) > 64:
            raise ValueError("--public-name is at most 64 bytes")
        if self.max_sessions < 1:
            raise ValueError("--max-sessions must be >= 1")
        for name in ("max_batch_size", "inference_max_length", "max_sessions_per_peer", "max_cache_tokens_per_peer"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1")
        if not (math.isfinite(self.session_open_rate) and self.session_open_rate > 0):
            raise ValueError("--session-open-rate must be a positive number of sessions a second")
        if type(self.max_connections) is not int or self.max_connections < 8:
            raise ValueError("--max-connections must be an integer >= 8")
        if self.cache_tokens is not None and self.cache_tokens < 1:
            raise ValueError("--cache-tokens must be >= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("--num-threads must be >= 1")
        for name in ("heartbeat", "session_idle_timeout", "join_wait"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds")
        for name in ("drain_timeout", "rebalance_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 seconds")
        if self.lease is not None and not (math.isfinite(self.lease) and self.lease > self.heartbeat):
            raise ValueError("--lease must be longer than --heartbeat")
        lease = self.lease if self.lease is not None else DEFAULT_LEASE_HEARTBEATS * self.heartbeat
        if lease > MAX_LEASE:
            raise ValueError(f"the lease ({lease:g} s: --lease, or {DEFAULT_LEASE_HEARTBEATS} x --heartbeat) "
                             f"exceeds the swarm's maximum of {MAX_LEASE:g} s")
