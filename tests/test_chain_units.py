"""The chain's bookkeeping on its own, without a network: which link a `PushFailed` blames."""

from __future__ import annotations

import torch
import trio

from pipeline._chain import Chain, ChainConfig, _Link
from pipeline._protocol import PushFailed, new_session_id
from pipeline._routing import Hop


def _link(peer: str, start: int, end: int) -> _Link:
    return _Link(Hop(peer, start, end), new_session_id(), session=None, cancel=trio.CancelScope())  # type: ignore[arg-type]


def _chain(*links: _Link) -> Chain:
    chain = Chain(host=None, view=None, model_hash="m", num_blocks=8, batch=1, max_length=16,  # type: ignore[arg-type]
                  dtype=torch.float32, config=ChainConfig())
    chain.links = list(links)
    return chain


def test_a_push_failure_blames_the_pair_only_while_its_target_is_the_next_link() -> None:
    up, dead, replacement = _link("a", 0, 4), _link("b", 4, 8), _link("c", 4, 8)
    chain = _chain(up, replacement)  # `dead` was replaced before the upstream's report came in
    chain._on_message(up, PushFailed(up.session_id, 3, dead.session_id, "push to b failed"))
    assert chain._push_failed_into(3) is None  # stale: the replacement is not blamed
    chain._on_message(up, PushFailed(up.session_id, 3, replacement.session_id, "push to c failed"))
    assert chain._push_failed_into(3) is replacement
    assert chain._push_failed_into(3) is None  # reported once
