"""The server's codec context of one round: the same public facts the clients encoded under.

The server must undo the clients' rotation, so it needs the exact public seed they used:
under ``security=malicious`` the agreed graph seed of the round (``srv.seed``, what each
client stored at sharing), otherwise H(run, round) (``public_round_seed``; the semi-honest
server's own graph seed is not what clients rotate with). ``expected_survivors`` is |U1|.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedstack.strategies.secagg.input_codec import CodecContext, public_round_seed


def round_context(
    srv: Any, malicious: bool, run_id: int, global_values: np.ndarray
) -> CodecContext:
    """The CodecContext of ServerRound ``srv`` (after its share stage closed)."""
    seed = srv.seed if malicious else public_round_seed(run_id, srv.round_num)
    return CodecContext(srv.round_num, seed, len(srv.shared), global_values)
