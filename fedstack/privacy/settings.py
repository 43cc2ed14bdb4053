"""Schema of `conf/dp/local.yaml` (`dp=local`): DP-SGD on every client.

Why the knobs look like this: the noise is either given directly (`noise_multiplier`) or
derived per client from a target ε for the *whole planned run* (num_rounds x local epochs),
because each client's sample rate depends on its own dataset size. The budget
(`max_epsilon`) is separate from the target: the target plans the noise, the budget is the
hard line a client refuses to cross. Under secagg/he (or with `sample_rate` set) δ, q, the
steps and σ are instead one public schedule for every client (`fedstack.privacy.schedule`),
so nothing a client sends in the clear depends on its n_k. Every check names the key it is
about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Accounting mechanisms (Opacus accountants) a client may use.
ACCOUNTANTS = ("rdp", "prv")
#: Per-sample clipping implementations: ours ("bk") and Opacus's grad-sample modes.
GRAD_SAMPLE_MODES = ("bk", "hooks", "functorch", "ew", "ghost")


def _config_error(message: str) -> Exception:
    # Imported lazily: the privacy package must import without the foundation's config.
    from fedstack.config import ConfigError

    return ConfigError(message)


def _check_noise_choice(noise_multiplier: float | None, target_epsilon: float | None) -> None:
    """Exactly one of σ and a target ε plans the noise; a given σ must be positive."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise _config_error(
            f"dp.noise_multiplier={noise_multiplier!r} and "
            f"dp.target_epsilon={target_epsilon!r}: set exactly one of them "
            "(the other null)"
        )
    if noise_multiplier is not None and not (
        math.isfinite(noise_multiplier) and noise_multiplier > 0
    ):
        raise _config_error(
            f"dp.noise_multiplier={noise_multiplier!r} must be > 0 (zero noise "
            "gives no differential privacy; use dp=none)"
        )


def _check_budget(max_epsilon: float | None, target_epsilon: float | None,
                  consequence: str = "") -> None:
    """A budget must be positive and not below the target the noise is planned to spend."""
    if max_epsilon is None:
        return
    if not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise _config_error(f"dp.max_epsilon={max_epsilon!r} must be > 0")
    if target_epsilon is not None and max_epsilon < target_epsilon:
        raise _config_error(
            f"dp.max_epsilon={max_epsilon!r} is below "
            f"dp.target_epsilon={target_epsilon!r}: the noise is planned to "
            f"spend the target by the last round{consequence}; "
            "lower dp.target_epsilon instead"
        )


def _run_budget(max_epsilon: float | None, target_epsilon: float | None) -> float | None:
    """The run-wide budget: max_epsilon, else the target, else none."""
    if max_epsilon is not None:
        return float(max_epsilon)
    if target_epsilon is not None:
        return float(target_epsilon)
    return None


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
    #: Public Poisson sample rate q shared by every client (fedstack.privacy.schedule);
    #: required under aggregation=secagg/he, null under fedavg: 1/ceil(n_k/B) per client.
    sample_rate: float | None = None

    def validate(self, cfg: Any) -> None:
        """Raise ConfigError naming the key of the first inconsistent setting."""
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise _config_error(f"dp.max_grad_norm={self.max_grad_norm!r} must be > 0")
        _check_noise_choice(self.noise_multiplier, self.target_epsilon)
        if self.target_epsilon is not None and not (
            math.isfinite(self.target_epsilon) and self.target_epsilon > 0
        ):
            raise _config_error(f"dp.target_epsilon={self.target_epsilon!r} must be > 0")
        if self.delta is not None and not (0.0 < self.delta < 1.0):
            raise _config_error(
                f"dp.delta={self.delta!r} must be in (0, 1) (null: 1/(10 n_k) per client, or "
                "1/(10 x the run's bound on n_k) under the public schedule)"
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
        _check_budget(self.max_epsilon, self.target_epsilon,
                      ", so every client would stop early")
        if cfg is not None:
            from fedstack.privacy.schedule import validate_public_schedule

            validate_public_schedule(cfg)

    def run_budget(self) -> float | None:
        """The run-wide per-client budget: max_epsilon, else the target, else none."""
        return _run_budget(self.max_epsilon, self.target_epsilon)


#: Aggregations under which the server sees each client's update and can clip it.
CENTRAL_AGGREGATIONS = ("fedavg",)


@dataclass
class CentralDPSettings:
    """`dp=central`: user-level DP-FedAvg (McMahan et al. 2018) by a trusted server.

    The server clips each client's update to `clip_norm`, sums the clipped updates of the
    clients it sampled (Poisson, each with probability `fraction_train`), adds Gaussian noise
    of std σ·C and divides by the *expected* cohort. The unit protected is a whole client;
    the server must be trusted (it sees every update in the clear).
    """

    name: str = "central"
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = 8.0
    delta: float | None = None
    accountant: str = "rdp"
    max_epsilon: float | None = None
    server_learning_rate: float = 1.0
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None

    def validate(self, cfg: Any) -> None:
        """Raise ConfigError naming the key of the first inconsistent setting."""
        aggregation = str(cfg.aggregation.name) if cfg is not None else "fedavg"
        if aggregation not in CENTRAL_AGGREGATIONS:
            raise _config_error(
                f"dp=central needs aggregation=fedavg, not aggregation={aggregation}: the "
                "server must see each client's update to clip it (under secure aggregation "
                "use dp=distributed, whose clients clip and add the noise themselves)")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise _config_error(f"dp.clip_norm={self.clip_norm!r} must be > 0")
        _check_noise_choice(self.noise_multiplier, self.target_epsilon)
        if self.target_epsilon is not None and not (
                math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise _config_error(f"dp.target_epsilon={self.target_epsilon!r} must be > 0")
        _check_budget(self.max_epsilon, self.target_epsilon)
        if self.delta is not None and not (0.0 < self.delta < 1.0):
            raise _config_error(
                f"dp.delta={self.delta!r} must be in (0, 1) (null: 1/(10 num_clients))")
        if self.accountant not in ACCOUNTANTS:
            raise _config_error(
                f"dp.accountant={self.accountant!r} must be one of: {', '.join(ACCOUNTANTS)}")
        if not (math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0):
            raise _config_error(
                f"dp.server_learning_rate={self.server_learning_rate!r} must be > 0")
        if cfg is not None:
            expected = float(cfg.fraction_train) * int(cfg.num_clients)
            if expected < 1.0:
                raise _config_error(
                    f"fraction_train={cfg.fraction_train} x num_clients={cfg.num_clients} "
                    f"= {expected:g} expected clients per round: dp=central divides the "
                    "noisy sum by it, so it must be >= 1")
        if self.adaptive_clipping:
            if not 0.0 < self.target_quantile < 1.0:
                raise _config_error(
                    f"dp.target_quantile={self.target_quantile!r} must be in (0, 1)")
            if not (math.isfinite(self.clip_learning_rate) and self.clip_learning_rate > 0):
                raise _config_error(
                    f"dp.clip_learning_rate={self.clip_learning_rate!r} must be > 0")
            stddev = self.clipped_count_stddev
            if stddev is not None:
                if not (math.isfinite(stddev) and stddev > 0):
                    raise _config_error(f"dp.clipped_count_stddev={stddev!r} must be > 0")
                if self.noise_multiplier is not None and 2 * stddev <= self.noise_multiplier:
                    raise _config_error(
                        f"dp.clipped_count_stddev={stddev!r} must exceed "
                        f"dp.noise_multiplier/2={self.noise_multiplier / 2:g}: the noisy "
                        "clipped count would otherwise spend the whole budget (Andrew et "
                        "al. 2021); raise it or set it null (max(expected clients/20, σ))")

    def run_budget(self) -> float | None:
        """The run's client-level budget: max_epsilon, else the target, else none."""
        return _run_budget(self.max_epsilon, self.target_epsilon)


#: Aggregations under which clients can add the noise inside the ring (dp=distributed).
DISTRIBUTED_AGGREGATIONS = ("secagg",)
#: Discrete noise of dp=distributed (docs/dp.md says why Skellam).
DISTRIBUTED_MECHANISMS = ("skellam",)
#: Its accountant: Skellam RDP (Agarwal et al. 2021, Thm 3.5).
DISTRIBUTED_ACCOUNTANTS = ("rdp",)


@dataclass
class DistributedDPSettings:
    """`dp=distributed`: client-level DP whose noise the clients add inside secure aggregation.

    Each client clips its model delta to `clip_norm`, rotates, scales and rounds it into the
    ring and adds a share of Skellam noise; only the noisy sum is ever unmasked, so nobody
    beyond the secure-aggregation threshold must be trusted. Mechanism and checks:
    `fedstack.privacy.distributed` (docs/dp.md, "distributed").
    """

    name: str = "distributed"
    mechanism: str = "skellam"
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = 8.0
    delta: float | None = None
    accountant: str = "rdp"
    max_epsilon: float | None = None
    server_learning_rate: float = 1.0
    dropout_slack: float = 0.1
    scale: float = 0.0
    rounding_beta: float = 0.6065306597126334
    wrap_probability: float = 1e-9

    def validate(self, cfg: Any) -> None:
        """Raise ConfigError naming the key; includes the ring's wrap and norm checks."""
        aggregation = str(cfg.aggregation.name) if cfg is not None else None
        if aggregation not in DISTRIBUTED_AGGREGATIONS:
            raise _config_error(
                f"dp=distributed needs aggregation=secagg, not aggregation={aggregation}: the "
                "clients' noise shares only add up to the planned noise inside secure "
                "aggregation (use dp=central to let a trusted server add it)")
        if self.mechanism not in DISTRIBUTED_MECHANISMS:
            raise _config_error(f"dp.mechanism={self.mechanism!r} must be one of: "
                                f"{', '.join(DISTRIBUTED_MECHANISMS)}")
        if self.accountant not in DISTRIBUTED_ACCOUNTANTS:
            raise _config_error(
                f"dp.accountant={self.accountant!r} must be one of: "
                f"{', '.join(DISTRIBUTED_ACCOUNTANTS)} (the Skellam mechanism's RDP bound)")
        if not (math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0):
            raise _config_error(
                f"dp.server_learning_rate={self.server_learning_rate!r} must be > 0")
        _check_budget(self.max_epsilon, self.target_epsilon)
        from fedstack.privacy.distributed.mechanism import MechanismError, plan_for
        from fedstack.privacy.distributed.run_config import mechanism_settings

        try:  # key ranges, the ring's wrap check and the norm bound (d = 1; the real d
            plan_for(mechanism_settings(cfg), 1)  # is checked again when the model is known)
        except MechanismError as exc:
            raise _config_error(str(exc)) from None

    def run_budget(self) -> float | None:
        """The run's client-level budget: max_epsilon, else the target, else none."""
        return _run_budget(self.max_epsilon, self.target_epsilon)
