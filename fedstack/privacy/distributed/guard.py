"""The dropout line of dp=distributed on the server: no unmasking below n_min survivors.

Each client added mu / n_min of the noise, so a sum of fewer than n_min survivors carries
less noise than the accountant assumes. The check must come BEFORE the unmask requests go
out: once the server has unmasked such a sum it has seen it, and aborting the update then
would not take the release back. :func:`guard_unmasking` wraps one ServerRound's
``close_masked`` (where U2 is fixed) with that check; the round then aborts as any
secure-aggregation round below its threshold does (model kept, round log says why).
"""

from __future__ import annotations

from typing import Any

from fedstack.strategies.secagg.errors import InputOutOfBounds, SecAggAbort
from fedstack.strategies.secagg.messages import STAGE_MASKED
from fedstack.strategies.secagg.server import STAGE_DONE


def check_before_unmask(srv: Any, codec: Any) -> None:
    """SecAggAbort unless the round's survivors U2 carry the planned noise (given |U1|)."""
    try:
        codec.check_survivors(len(srv.survivors), len(srv.shared))
    except InputOutOfBounds as exc:
        srv.stage = STAGE_DONE
        raise SecAggAbort(srv.round_num, STAGE_MASKED, str(exc)) from exc


def guard_unmasking(srv: Any, codec: Any) -> None:
    """Make ``srv.close_masked`` refuse to ask for unmasking below n_min survivors."""
    close = srv.close_masked

    def guarded_close() -> dict:
        requests = close()  # fixes U2 (and aborts below t)
        check_before_unmask(srv, codec)
        return requests

    srv.close_masked = guarded_close
