"""``aggregation=he`` settings: the schema of conf/aggregation/he.yaml.

Every YAML key is a field with the YAML's default; "auto" is 0 and "not given" is "" so the
schema stays plain-typed for Hydra/OmegaConf. Validation runs on the server and again on every
client (the config travels in each message), so it checks numbers only, never files: the
server's public-context path does not exist on a client and vice versa.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from fedstack.strategies.he.presets import (
    PRESETS,
    Capacity,
    CKKSPreset,
    check_capacity,
    get_preset,
    max_safe_scale_bits,
)

AUTO = 0
# The largest scale auto picks: more bits of precision than float32 models carry is useless.
AUTO_SCALE_CAP_BITS = 45
MIN_SCALE_BITS = 20
MAX_SCALE_BITS = 58


def _config_error(message: str) -> Exception:
    """``fedstack.config.ConfigError`` (a ValueError) when the foundation provides it."""
    try:
        from fedstack.config import ConfigError
    except ImportError:  # the HE primitives are usable without the app's config module
        return ValueError(message)
    return ConfigError(message)


@functools.cache
def data_prime(preset_name: str) -> int:
    """The data prime SEAL picks for a preset (deterministic: the largest fitting NTT prime)."""
    import tenseal.sealapi as sealapi

    preset = get_preset(preset_name)
    primes = sealapi.CoeffModulus.Create(
        preset.poly_modulus_degree, list(preset.coeff_modulus_bits)
    )
    data = primes if len(primes) == 1 else primes[:-1]
    value = 1
    for p in data:
        value *= p.value()
    return value


@dataclass
class HESettings:
    """Parameters of CKKS encrypted averaging (see docs/he.md)."""

    name: str = "he"
    preset: str = "standard"
    scale_bits: int = AUTO
    max_clients: int = 100
    max_weight: int = 10_000
    max_abs_value: float = 16.0
    max_abs_error: float = 1e-4
    seeded: bool = True
    public_context: str = ""
    secret_context: str = ""

    def ckks_preset(self) -> CKKSPreset:
        return get_preset(self.preset)

    def capacity(self) -> Capacity:
        """Capacity at the effective scale; raises ConfigError naming the keys if unsafe."""
        preset = self.ckks_preset()
        prime = data_prime(self.preset)
        common = {
            "data_prime": prime,
            "max_clients": int(self.max_clients),
            "max_weight": float(self.max_weight),
            "max_abs_value": float(self.max_abs_value),
        }
        try:
            if self.scale_bits == AUTO:
                bits = min(max_safe_scale_bits(**common), AUTO_SCALE_CAP_BITS)
                if bits < MIN_SCALE_BITS:
                    raise ValueError(
                        f"no safe scale >= 2^{MIN_SCALE_BITS} for preset {preset.name!r} "
                        f"(largest: 2^{bits})"
                    )
            else:
                bits = int(self.scale_bits)
            return check_capacity(preset, scale_bits=bits, **common)
        except ValueError as exc:
            raise _config_error(
                f"aggregation.preset/scale_bits/max_clients/max_weight/max_abs_value: {exc}"
            ) from None

    def effective_scale_bits(self) -> int:
        return self.capacity().scale_bits

    def validate(self, cfg: Any = None) -> None:
        """Raise ConfigError naming the offending key."""
        if self.name != "he":
            raise _config_error(f"aggregation.name={self.name!r} must be 'he' for this schema")
        if self.preset not in PRESETS:
            raise _config_error(
                f"aggregation.preset={self.preset!r} is not a preset "
                f"(choose one of: {', '.join(sorted(PRESETS))})"
            )
        try:
            self.ckks_preset().check_security()
        except ValueError as exc:
            raise _config_error(f"aggregation.preset={self.preset!r}: {exc}") from None
        if self.scale_bits != AUTO and not MIN_SCALE_BITS <= self.scale_bits <= MAX_SCALE_BITS:
            raise _config_error(
                f"aggregation.scale_bits={self.scale_bits} must be 0 (auto) or in "
                f"{MIN_SCALE_BITS}..{MAX_SCALE_BITS}"
            )
        if self.max_clients < 1:
            raise _config_error(f"aggregation.max_clients={self.max_clients} must be >= 1")
        if self.max_weight < 1:
            raise _config_error(f"aggregation.max_weight={self.max_weight} must be >= 1")
        if not self.max_abs_value > 0:
            raise _config_error(f"aggregation.max_abs_value={self.max_abs_value} must be > 0")
        if not self.max_abs_error > 0:
            raise _config_error(f"aggregation.max_abs_error={self.max_abs_error} must be > 0")
        num_clients = None if cfg is None else cfg.get("num_clients")
        if num_clients is not None and int(num_clients) > self.max_clients:
            raise _config_error(
                f"aggregation.max_clients={self.max_clients} is below num_clients={num_clients}"
            )
        cap = self.capacity()
        if cap.worst_abs_error > self.max_abs_error:
            raise _config_error(
                f"aggregation.max_abs_error={self.max_abs_error:g}: preset {self.preset!r} at "
                f"scale 2^{cap.scale_bits} guarantees only {cap.worst_abs_error:.3g} per "
                "averaged value (total weight 1); lower max_clients/max_weight/max_abs_value, "
                "raise scale_bits or pick the 'precise' preset"
            )
