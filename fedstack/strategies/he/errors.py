"""The error every HE message parser raises for input that must be rejected.

Its own module so that the array-level sum (`rns_add`) and the protocol (`ckks`) share it
without importing each other; `ckks` re-exports it.
"""

from __future__ import annotations


class CiphertextError(ValueError):
    """An encrypted message that must be rejected; the message says why."""
