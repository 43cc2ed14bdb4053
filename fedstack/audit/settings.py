"""The `audit:` section of the run config: audit mode is off unless asked for.

Why run options and not flags of the audit command: the server's view of a round exists only
while the round runs, and canaries must be in the clients' data while they train; afterwards
only the aggregate and the model are left to attack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: Canary kinds (fedstack.audit.canaries), named here so validation needs no torch.
CANARY_KINDS = ("mislabelled", "ood")


@dataclass
class AuditSettings:
    """Audit mode. Every key's default leaves it off.

    - `record_round=N`: keep everything the server sent and received in round N (and what it
      computed from it) under `<run_dir>/audit/round_N/`, for `fedstack audit`.
    - `canaries=m` (0: off), `canary_kind`, `canary_holders` (partition ids; null: every
      client), `canary_key` (set by the server when it creates the run): the one-run DP
      audit's canaries (fedstack.audit.canaries).
    """

    record_round: int | None = None
    canaries: int = 0
    canary_kind: str = "ood"
    canary_holders: list[int] | None = None
    canary_key: str | None = None

    def validate(self, cfg: Any) -> None:
        from fedstack.config import ConfigError

        if self.record_round is not None and not 1 <= int(self.record_round) <= int(
                cfg.num_rounds):
            raise ConfigError(f"audit.record_round={self.record_round!r} must be a round of "
                              f"the run, between 1 and num_rounds={cfg.num_rounds} (or null: "
                              "audit mode off)")
        if self.canaries < 0:
            raise ConfigError(f"audit.canaries={self.canaries!r} must be >= 0 (0: no canaries)")
        if self.canary_kind not in CANARY_KINDS:
            raise ConfigError(f"audit.canary_kind={self.canary_kind!r} must be one of: "
                              f"{', '.join(CANARY_KINDS)}")
        for holder in self.canary_holders or []:
            if not 0 <= int(holder) < int(cfg.num_clients):
                raise ConfigError(f"audit.canary_holders: {holder!r} is not a partition id "
                                  f"(0..{int(cfg.num_clients) - 1})")
        if self.canary_key is not None and re.fullmatch(r"[0-9a-f]{64}",
                                                        str(self.canary_key)) is None:
            raise ConfigError("audit.canary_key is assigned by the server (64 hex digits); "
                              "leave it null")
