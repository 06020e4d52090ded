"""Network-level constants of the p2p layer, in one place.

Deadlines are in seconds. Everything that reads or writes the network is bounded by one of these
(or by a caller's `trio.fail_after` around it).
"""

from __future__ import annotations

# --- wire format ---------------------------------------------------------------------------
WIRE_VERSION = 1
FRAME_PREFIX_SIZE = 4  # u32 little-endian body length
HEADER_LEN_SIZE = 4  # u32 little-endian msgpack header length, first field of the body
TENSOR_ALIGNMENT = 8  # every tensor payload starts at a multiple of 8 from the body start
MAX_FRAME_SIZE = 128 * 1024 * 1024  # default largest accepted frame body (HostConfig overrides)
MAX_HEADER_SIZE = 8 * 1024 * 1024  # largest msgpack header, whatever the frame size
MAX_TENSORS_PER_MESSAGE = 64
MAX_TENSOR_NDIM = 8
MAX_TYPE_TAG_LEN = 64
PREALLOCATE_LIMIT = 1024 * 1024  # bodies up to this are allocated when announced; bigger ones as they arrive

# --- sessions ------------------------------------------------------------------------------
HEARTBEAT_INTERVAL = 0.5  # a session sends a heartbeat when it has sent nothing for this long
# No bytes from the peer for this long while we wait for them => PeerFrozenError. Detection takes
# HEARTBEAT_TIMEOUT + one watchdog tick after the peer's last byte, i.e. < 3 s after a SIGSTOP.
# Consequence for applications: an event loop blocked longer than this (a synchronous forward
# pass, say) looks frozen to its peers; run heavy compute in `trio.to_thread.run_sync`.
HEARTBEAT_TIMEOUT = 2.0
WATCHDOG_TICK = 0.2
WRITE_STALL_DEADLINE = 10.0  # a write chunk that makes no progress for this long => PeerTimeoutError
# Big frames are written in pieces of this size: 65535 (largest Noise message) - 16 (Noise tag)
# - 12 (yamux header). py-libp2p's yamux cuts writes into 65524-byte frames, which Noise then
# splits into 65519 + 17 bytes: two encryptions, two socket writes, two reads per frame on the
# other side. Pieces of 65507 make every yamux frame one Noise message: ~25% more throughput and
# less CPU on both ends (measured). Deadlines take effect between pieces.
WRITE_CHUNK = 65535 - 16 - 12
OPEN_STREAM_DEADLINE = 10.0  # dial (if needed) + stream open + protocol negotiation
GOODBYE_LINGER = 1.0  # after our goodbye, wait this long for the peer's before resetting
RESET_DEADLINE = 1.0  # best-effort sends on a failing stream (error frame, reset)
SESSION_RECEIVE_QUEUE = 8  # decoded messages buffered per session before backpressure
READ_SIZE = 4 * 1024 * 1024  # largest single stream read
COALESCE_LIMIT = 256 * 1024  # frames up to this size are joined into one write
DEFAULT_MAX_CONCURRENT_PER_PEER = 16  # handler invocations per peer and protocol
# Slow-loris: a frame that has started arriving gets FRAME_GRACE seconds, then must average at
# least FRAME_MIN_RATE bytes a second (counted only while we wait for its bytes, not while we
# are too busy to read them): a peer trickling a byte a second is cut off after ~FRAME_GRACE s.
# 16 KiB/s is far below any link a session's tensors are worth sending over.
FRAME_GRACE = 5.0
FRAME_MIN_RATE = 16 * 1024
UNARY_REQUEST_DEADLINE = 10.0  # a unary stream must deliver its request within this long
UNARY_HANDLER_DEADLINE = 60.0  # and its handler answer within this long (a dial-back takes ~10 s)

# --- host ----------------------------------------------------------------------------------
DIAL_DEADLINE = 10.0
# private swarms (_pnet.py): the peer's 24-byte nonce and its first 20 bytes (multistream's
# header) must arrive within this long; a peer that sends nothing is not waited on for longer
PNET_HANDSHAKE_DEADLINE = 10.0
# Inbound libp2p connections (see `_limits`): at most MAX_CONNECTIONS in all (py-libp2p's
# default), and of them at most MAX_HANDSHAKES in their handshake (pnet, Noise, yamux), at most
# MAX_HANDSHAKES_PER_IP from one address, each for at most HANDSHAKE_DEADLINE. A full gate
# evicts the oldest handshake older than HANDSHAKE_EVICT_AGE for a new connection (an honest
# handshake takes milliseconds), else closes the new one at once, unread.
MAX_CONNECTIONS = 300
MAX_HANDSHAKES = 64
MAX_HANDSHAKES_PER_IP = 32
HANDSHAKE_DEADLINE = 10.0
HANDSHAKE_EVICT_AGE = 0.5
IDENTIFY_WAIT = 5.0  # how long a new connection may take to be identified before DHT seeding
BOOTSTRAP_DEADLINE = 15.0

# --- direct lanes (_lane.py) ---------------------------------------------------------------
LANE_TICKET_TTL = 10.0  # an invite's ticket must be used within this long
LANE_HELLO_DEADLINE = 5.0  # a new lane connection must present its ticket within this long
LANE_CONNECT_DEADLINE = 2.0  # client: TCP connect + hello + acknowledgement
LANE_MAX_PENDING = 256  # unused tickets held at once (more invites are refused: LaneUnavailable)
# connections that have not presented a ticket yet; more are closed at once (a flood of idle
# connections costs one task and one descriptor each until the hello deadline)
LANE_MAX_HANDSHAKES = 64
# lanes open or invited at once (each is a descriptor): beyond, sessions stay on libp2p. Two per
# session at most (the client's, a push from upstream) on a node of 128 sessions, with room.
LANE_MAX_OPEN = 512
# a peer whose lane could not be reached at an IP is not asked for one there again for this
# long: its sessions go straight to libp2p instead of waiting out LANE_CONNECT_DEADLINE each
LANE_UNREACHABLE_TTL = 300.0

# --- gossip --------------------------------------------------------------------------------
GOSSIP_MAX_MESSAGE_SIZE = 64 * 1024
GOSSIP_MAX_RPC_SIZE = 1024 * 1024  # one inbound pubsub RPC may batch several messages
# py-libp2p drops everything over 10 msg/s per topic per forwarding peer by default. A forwarding
# peer relays every origin's messages, so the limit must cover (swarm size x per-node rate):
# 200/s covers ~100 nodes announcing twice a second.
GOSSIP_MAX_MESSAGES_PER_TOPIC_PER_PEER_PER_SECOND = 200.0
GOSSIP_DEGREE = 6
GOSSIP_DEGREE_LOW = 4
GOSSIP_DEGREE_HIGH = 12
GOSSIP_HEARTBEAT_INTERVAL = 1
GOSSIP_SUBSCRIBER_QUEUE = 256  # per local subscriber; a full queue drops (gossip is lossy)

# --- DHT -----------------------------------------------------------------------------------
DHT_PROVIDER_NAMESPACE = b"lamina/providers/"
DHT_QUERY_DEADLINE = 30.0
