"""Exceptions of the secure-aggregation protocol core."""

from __future__ import annotations


class SecAggAbort(RuntimeError):
    """The round cannot complete safely (fewer than t parties); the model must stay unchanged."""

    def __init__(self, round_num: int, stage: str, reason: str) -> None:
        super().__init__(f"secagg round {round_num} aborted at stage '{stage}': {reason}")
        self.round_num = round_num
        self.stage = stage
        self.reason = reason


REFUSAL_CODES = frozenset({
    "protocol",  # malformed or inconsistent request (default)
    "stale",  # round closed, replayed, out of order or at another stage
    "keys",  # the request misstates keys (own advert, duplicates, wrong neighbourhood)
    "identity",  # no signing identity / roster for security=malicious
    "signature",  # an advert, reveal or view signature does not verify against the roster
    "view",  # the survivor view differs from the one this client signed or stored
    "threshold",  # fewer than t parties where t are needed
    "cohort",  # a set smaller than the minimum cohort (or max_clients exceeded)
    "connectivity",  # the graph on the survivors has a component below the minimum cohort
    "unmasked-train",  # a train message without secagg parts (would send a plaintext update)
})
"""Fixed reason codes a client sends the server when it refuses (never data-dependent text)."""


class ProtocolViolation(ValueError):
    """A received protocol message is malformed, out of order, replayed or unsafe to answer.

    Raised by a client refusing a request and by the server rejecting a reply; the caller
    treats the offending party as dropped for the round. ``code`` (one of
    :data:`REFUSAL_CODES`) is all a client tells the server; the message (which may name
    counts and ids) goes to the node's own log.
    """

    def __init__(self, message: str, code: str = "protocol") -> None:
        if code not in REFUSAL_CODES:
            raise ValueError(f"unknown secagg refusal code {code!r}")
        super().__init__(message)
        self.code = code


class InputOutOfBounds(ValueError):
    """The unmasked sum lies outside what honest (clipped, weight-bounded) inputs produce.

    Raised by an input codec's ``check_bounds``; the server aborts the round on it.
    """
