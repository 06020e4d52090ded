"""Quiet py-libp2p's loggers.

py-libp2p 0.8.1 logs at WARNING and ERROR on normal paths (a peer closing a stream, a
negotiation racing a close), and with no handler configured those lines reach stderr through
`logging.lastResort`. Unless the user asked for libp2p logs with ``LIBP2P_DEBUG`` (py-libp2p's
own switch), we silence them: failures that matter surface as lamina errors and are logged on
the ``lamina.p2p`` logger.
"""

from __future__ import annotations

import logging
import os

_NOISY = ("libp2p", "multiaddr", "async_service", "anyio_service")


def quiet_libp2p_logging(level: int = logging.CRITICAL) -> None:
    """Raise the threshold of libp2p's loggers to `level` (default: only CRITICAL)."""
    if os.environ.get("LIBP2P_DEBUG"):
        return
    for name in _NOISY:
        log = logging.getLogger(name)
        log.setLevel(level)
        if not log.handlers:
            log.addHandler(logging.NullHandler())  # never fall through to logging.lastResort
