"""The mechanism's settings from a run config (``cfg.dp`` of dp=distributed, ``cfg.aggregation``).

Kept apart from the primitives so they import neither OmegaConf nor the app's config: the
run config only says which numbers to use. Both ends call this on the same run config, so a
client derives the noise it adds itself.
"""

from __future__ import annotations

from typing import Any

from .mechanism import MechanismSettings

#: delta = 1 / (DELTA_PER_CLIENTS * num_clients) when dp.delta is null (as dp=central).
DELTA_PER_CLIENTS = 10


def run_delta(cfg: Any) -> float:
    """dp.delta, or 1 / (10 num_clients): below 1 / (number of units protected)."""
    delta = cfg.dp.get("delta") if hasattr(cfg.dp, "get") else cfg.dp.delta
    if delta is not None:
        return float(delta)
    return 1.0 / (DELTA_PER_CLIENTS * int(cfg.num_clients))


def mechanism_settings(cfg: Any) -> MechanismSettings:
    """MechanismSettings from ``cfg.dp`` (distributed) and ``cfg.aggregation`` (secagg)."""
    dp, agg = cfg.dp, cfg.aggregation
    return MechanismSettings(
        clip=float(dp.clip_norm),
        noise_multiplier=None if dp.noise_multiplier is None else float(dp.noise_multiplier),
        target_epsilon=None if dp.target_epsilon is None else float(dp.target_epsilon),
        delta=run_delta(cfg),
        rounds=int(cfg.num_rounds),
        dropout_slack=float(dp.dropout_slack),
        rounding_beta=float(dp.rounding_beta),
        wrap_probability=float(dp.wrap_probability),
        scale=float(dp.scale),
        bits=int(agg.bits),
        max_clients=int(agg.max_clients),
    )
