"""Schema of `conf/dp/local.yaml` (`dp=local`): DP-SGD on every client.

Why the knobs look like this: the noise is either given directly (`noise_multiplier`) or
derived per client from a target ε for the *whole planned run* (num_rounds x local epochs),
because each client's sample rate depends on its own dataset size. The budget
(`max_epsilon`) is separate from the target: the target plans the noise, the budget is the
hard line a client refuses to cross. Every check names the key it is about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Accounting mechanisms (Opacus accountants) a client may use.
ACCOUNTANTS = ("rdp", "prv")
#: Per-sample clipping implementations: ours ("bk") and Opacus's grad-sample modes.
GRAD_SAMPLE_MODES = ("bk", "hooks", "functorch", "ew", "ghost")
#: Node-config key with which a data owner tightens the run's budget on its own node.
NODE_MAX_EPSILON_KEY = "max-epsilon"


def _config_error(message: str) -> Exception:
    # Imported lazily: the privacy package must import without the foundation's config.
    from fedstack.config import ConfigError

    return ConfigError(message)


@dataclass
class LocalDPSettings:
    """`dp=local`: per-client DP-SGD with cumulative accounting and a budget."""

    name: str = "local"
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = 8.0
    delta: float | None = None
    accountant: str = "rdp"
    grad_sample_mode: str = "bk"
    max_epsilon: float | None = None
    secure_rng: bool = False

    def validate(self, cfg: Any) -> None:
        """Raise ConfigError naming the key of the first inconsistent setting."""
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise _config_error(f"dp.max_grad_norm={self.max_grad_norm!r} must be > 0")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise _config_error(
                f"dp.noise_multiplier={self.noise_multiplier!r} and "
                f"dp.target_epsilon={self.target_epsilon!r}: set exactly one of them "
                "(the other null)"
            )
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
        ):
            raise _config_error(
                f"dp.noise_multiplier={self.noise_multiplier!r} must be > 0 (zero noise "
                "gives no differential privacy; use dp=none)"
            )
        if self.target_epsilon is not None and not (
            math.isfinite(self.target_epsilon) and self.target_epsilon > 0
        ):
            raise _config_error(f"dp.target_epsilon={self.target_epsilon!r} must be > 0")
        if self.delta is not None and not (0.0 < self.delta < 1.0):
            raise _config_error(
                f"dp.delta={self.delta!r} must be in (0, 1) (null: 1/(10 n_k) per client)"
            )
        if self.accountant not in ACCOUNTANTS:
            raise _config_error(
                f"dp.accountant={self.accountant!r} must be one of: {', '.join(ACCOUNTANTS)}"
            )
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise _config_error(
                f"dp.grad_sample_mode={self.grad_sample_mode!r} must be one of: "
                f"{', '.join(GRAD_SAMPLE_MODES)}"
            )
        if self.secure_rng and self.grad_sample_mode != "bk":
            raise _config_error(
                f"dp.secure_rng=true needs dp.grad_sample_mode=bk, not "
                f"{self.grad_sample_mode!r}: Opacus's modes draw their noise from a "
                "torch.Generator, which is not a cryptographic generator"
            )
        if self.max_epsilon is not None:
            if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
                raise _config_error(f"dp.max_epsilon={self.max_epsilon!r} must be > 0")
            if self.target_epsilon is not None and self.max_epsilon < self.target_epsilon:
                raise _config_error(
                    f"dp.max_epsilon={self.max_epsilon!r} is below "
                    f"dp.target_epsilon={self.target_epsilon!r}: the noise is planned to "
                    "spend the target by the last round, so every client would stop early; "
                    "lower dp.target_epsilon instead"
                )

    def run_budget(self) -> float | None:
        """The run-wide per-client budget: max_epsilon, else the target, else none."""
        if self.max_epsilon is not None:
            return float(self.max_epsilon)
        if self.target_epsilon is not None:
            return float(self.target_epsilon)
        return None
