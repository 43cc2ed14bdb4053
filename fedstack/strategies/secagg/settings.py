"""``aggregation=secagg`` settings: the schema of conf/aggregation/secagg.yaml.

Every YAML key is a field with the YAML's default. Auto values are encoded as 0 (not a
string) so the schema stays plain-typed for Hydra/OmegaConf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedstack.crypto.prg import PRG_ALGORITHMS
from fedstack.crypto.quantise import FixedPointCodec, QuantisationError, auto_scale

from .input_codec import codec_for
from .params import GRAPHS, SECURITIES, SECURITY_MALICIOUS, ProtocolParams

AUTO = 0


def _config_error(message: str) -> Exception:
    """``fedstack.config.ConfigError`` (a ValueError) when the foundation provides it."""
    try:
        from fedstack.config import ConfigError
    except ImportError:  # the protocol core is usable without the app's config module
        return ValueError(message)
    return ConfigError(message)


def _top(cfg: Any, key: str) -> Any:
    """A top-level run-config value from a dict or DictConfig (None when absent)."""
    return None if cfg is None else cfg.get(key)


@dataclass
class SecAggSettings:
    """Parameters of the secure-aggregation protocol (see docs/secagg.md)."""

    name: str = "secagg"
    graph: str = "complete"
    neighbours: int = AUTO
    threshold: float = 0.6
    bits: int = 32
    clip: float = 4.0
    scale: float = AUTO
    max_clients: int = 50
    max_weight: int = 5000
    max_quant_error: float = 0.001
    prg: str = "aes"
    stage_timeout: float = 120.0
    pipeline: bool = True
    security: str = SECURITY_MALICIOUS

    def threshold_spec(self) -> int | float:
        """A value >= 2 is a share count, a value in (0.5, 1] a fraction."""
        t = float(self.threshold)
        return int(t) if t >= 2 else t

    def codec(self, max_num_examples: int | None) -> FixedPointCodec:
        """The fixed-point codec; raises ValueError naming the keys when it could wrap."""
        max_weight = int(self.max_weight) or int(max_num_examples or 0)
        if max_weight < 1:
            raise _config_error(
                "aggregation.max_weight=0 (auto) needs a positive top-level "
                "max_num_examples to bound n_k"
            )
        try:
            scale = float(self.scale) or auto_scale(
                int(self.bits), float(self.clip), int(self.max_clients), max_weight
            )
            return FixedPointCodec(
                int(self.bits), float(self.clip), scale, int(self.max_clients), max_weight
            )
        except QuantisationError as exc:
            raise _config_error(
                f"aggregation.bits/clip/scale/max_clients/max_weight: {exc}"
            ) from exc

    def protocol(self, cfg: Any = None) -> ProtocolParams:
        """Protocol parameters shared by server and clients (with the run's input codec)."""
        codec = self.codec(_top(cfg, "max_num_examples"))
        try:
            input_codec = codec_for(cfg, codec)
        except (ImportError, AttributeError) as exc:
            raise _config_error(
                f"dp={_top(_top(cfg, 'dp'), 'name')} with aggregation=secagg: its input codec "
                f"cannot be loaded ({exc})"
            ) from exc
        return ProtocolParams(
            codec=codec,
            graph=self.graph,
            neighbours=int(self.neighbours) or None,
            threshold=self.threshold_spec(),
            prg=self.prg,
            security=self.security,
            input_codec=input_codec,
        )

    def validate(self, cfg: Any = None) -> None:
        """Raise ConfigError naming the offending key; checks against the run's client count."""
        if self.name != "secagg":
            raise _config_error(f"aggregation.name={self.name!r} must be 'secagg' for this schema")
        if self.graph not in GRAPHS:
            raise _config_error(f"aggregation.graph={self.graph!r} must be one of {GRAPHS}")
        if self.prg not in PRG_ALGORITHMS:
            raise _config_error(f"aggregation.prg={self.prg!r} must be one of {PRG_ALGORITHMS}")
        if self.security not in SECURITIES:
            raise _config_error(
                f"aggregation.security={self.security!r} must be one of {SECURITIES}"
            )
        if int(self.neighbours) and (int(self.neighbours) < 2 or int(self.neighbours) % 2):
            raise _config_error(
                f"aggregation.neighbours={self.neighbours} must be 0 (auto) or an even number >= 2"
            )
        t = float(self.threshold)
        if not (0.5 < t <= 1.0 or (t >= 2 and t == int(t))):
            raise _config_error(
                f"aggregation.threshold={self.threshold} must be a fraction in (0.5, 1] "
                "or an integer count >= 2"
            )
        if not float(self.stage_timeout) > 0:
            raise _config_error(f"aggregation.stage_timeout={self.stage_timeout} must be > 0")
        if not float(self.max_quant_error) > 0:
            raise _config_error(f"aggregation.max_quant_error={self.max_quant_error} must be > 0")
        params = self.protocol(cfg)
        if params.codec.error_bound > float(self.max_quant_error):
            raise _config_error(
                f"aggregation.scale resolves to {params.codec.scale:g}: rounding error "
                f"{params.codec.error_bound:.3g} exceeds "
                f"aggregation.max_quant_error={self.max_quant_error}; "
                "raise aggregation.bits or lower aggregation.clip/max_clients/max_weight"
            )
        num_clients = _top(cfg, "num_clients")
        if num_clients is not None:
            n = int(num_clients)
            if n > int(self.max_clients):
                raise _config_error(
                    f"num_clients={n} exceeds aggregation.max_clients={self.max_clients} "
                    "(the no-wrap bound of the quantisation)"
                )
            try:
                params.round_threshold(n)
            except ValueError as exc:
                raise _config_error(
                    f"aggregation.threshold={self.threshold} with num_clients={n}: {exc}"
                ) from exc
