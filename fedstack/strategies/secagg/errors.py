"""Exceptions of the secure-aggregation protocol core."""

from __future__ import annotations


class SecAggAbort(RuntimeError):
    """The round cannot complete safely (fewer than t parties); the model must stay unchanged."""

    def __init__(self, round_num: int, stage: str, reason: str) -> None:
        super().__init__(f"secagg round {round_num} aborted at stage '{stage}': {reason}")
        self.round_num = round_num
        self.stage = stage
        self.reason = reason


class ProtocolViolation(ValueError):
    """A received protocol message is malformed, out of order, replayed or unsafe to answer.

    Raised by a client refusing a request and by the server rejecting a reply; the caller
    treats the offending party as dropped for the round.
    """
