"""The data owner's policy: what a node accepts, whatever the server proposes.

Why one place: the server's run configuration is only a proposal. Every layer that could
expose a node's data (the aggregation dispatcher, secure aggregation, the DP trainer, the
replies under secagg/HE) asks the same `NodePolicy` whether a round is acceptable, and a
round weaker than the policy is refused with a fixed reason code.

Sources: the node's own node config (never the run config): inline keys (`min-cohort=5`)
and a TOML file named by `policy=/path/policy.toml` with the same keys. When both set a
key, the STRICTER value wins (the file cannot loosen an inline key, nor the reverse), so a
site-wide policy file and a per-node override can only add restrictions to each other.

Refusals (`PolicyRefusal`) carry a fixed code; the numbers behind a decision (which may
depend on the node's data, e.g. its ε) go to the node's own log only (`.detail`).

No Flower or torch import at module level: every layer may import this cheaply.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedstack.consortium import ROSTER_NODE_KEY
from fedstack.log import get_logger

log = get_logger(__name__)

#: Error code of a reply refused by the node's own policy.
POLICY_REFUSED_CODE = 4010

#: Every reason code a refusal may carry (fixed tokens: nothing data-dependent).
REASON_CODES = frozenset({
    "aggregation",   # the proposed aggregation is not in allowed_aggregations
    "security",      # secagg security weaker than required (require_signatures)
    "threshold",     # secagg threshold fraction t/k not above max(0.5, min_threshold)
    "cohort",        # fewer clients in a decodable sum than min_cohort
    "dp-required",   # the round's DP does not protect this node's update (require_dp)
    "dp-noise",      # noise multiplier below min_noise_multiplier
    "dp-epsilon",    # the round would take ε above max_epsilon
    "clear-metric",  # a reply would carry a value the policy keeps inside the node
    "misconfigured",  # the node's own policy (file or keys) cannot be read: fail closed
})

#: Node-config key naming the TOML policy file.
POLICY_FILE_KEY = "policy"
#: Node-config / policy-file keys, one per NodePolicy field.
REQUIRE_AGGREGATION_KEY = "require-aggregation"
MIN_THRESHOLD_KEY = "min-threshold"
MIN_COHORT_KEY = "min-cohort"
REQUIRE_SIGNATURES_KEY = "require-signatures"
REQUIRE_DP_KEY = "require-dp"
TRUST_SERVER_DP_KEY = "trust-server-dp"
MAX_EPSILON_KEY = "max-epsilon"
MIN_NOISE_MULTIPLIER_KEY = "min-noise-multiplier"
CLEAR_METRICS_KEY = "clear-metrics"

#: Threshold fractions at or below one half are never accepted: two disjoint halves of a
#: neighbourhood could then each unmask a different view.
THRESHOLD_FLOOR = 0.5
#: The smallest `min-cohort` a policy may set: a one-client "sum" is that client's update.
SMALLEST_MIN_COHORT = 2
#: Defaults (see docs/policy.md).
DEFAULT_MIN_THRESHOLD = 0.5
DEFAULT_MIN_COHORT = 3
#: partition-id names the client in the run's report; epsilon and delta are what the server's
#: privacy ledger vets (dp=local), epsilon-budget the budget the client enforces (the run's or
#: its node's max-epsilon, no data in it), so a node keeps them in the clear unless its policy
#: says otherwise (see docs/policy.md).
DEFAULT_CLEAR_METRICS = frozenset({"partition-id", "epsilon", "delta", "epsilon-budget"})

#: DP modes as named in the run config (`dp=`).
DP_NONE = "none"
DP_CENTRAL = "central"
#: DP modes whose noise is added on the node (or inside the secure sum) before the update
#: leaves it.
DP_ON_NODE = frozenset({"local", "distributed"})
SECURE_SECURITY = "malicious"


class PolicyError(ValueError):
    """A policy file or node-config policy key that cannot be used (names file and key)."""


class PolicyRefusal(Exception):
    """A round the node's policy refuses.

    `code` is one of `REASON_CODES` and is all the server ever sees; `detail` explains the
    decision with numbers, for the node's own log only.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        if code not in REASON_CODES:
            raise ValueError(f"unknown policy reason code {code!r}")
        self.code = code
        self.detail = detail
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        """The fixed text sent to the server."""
        return f"node policy refuses: {self.code}"


@dataclass(frozen=True)
class NodePolicy:
    """What this node accepts. Defaults are the weakest policy fedstack still enforces."""

    allowed_aggregations: frozenset[str] | None = None
    """Aggregations this node accepts (None: any)."""
    min_threshold: float = DEFAULT_MIN_THRESHOLD
    """Secagg: t / neighbourhood size must be > 0.5 and >= this."""
    min_cohort: int = DEFAULT_MIN_COHORT
    """Fewest clients whose inputs any sum the server can decode may contain."""
    require_signatures: bool = False
    """Secagg must run `security=malicious` (defaults to true when the node pins a roster)."""
    require_dp: bool = False
    """Refuse rounds whose DP does not protect this node's update before it leaves."""
    trust_server_dp: bool = False
    """With require_dp: accept `dp=central` (noise added by the server, after aggregation)."""
    max_epsilon: float | None = None
    """This node's DP budget; tightens the run's `dp.max_epsilon`, never loosens it."""
    min_noise_multiplier: float | None = None
    """Floor on the noise multiplier of any DP round this node takes part in."""
    clear_metrics: frozenset[str] = field(default=DEFAULT_CLEAR_METRICS)
    """Metric names that may leave the node in the clear under secagg / HE."""

    def check_aggregation(self, name: str) -> None:
        """Refuse an aggregation this node did not agree to."""
        if self.allowed_aggregations is not None and name not in self.allowed_aggregations:
            raise PolicyRefusal(
                "aggregation",
                f"aggregation={name} is not in {REQUIRE_AGGREGATION_KEY}="
                f"{','.join(sorted(self.allowed_aggregations))}",
            )

    def check_secagg(self, *, security: str, threshold: int, neighbourhood: int,
                     cohort: int) -> None:
        """Refuse a secure-aggregation round weaker than the policy.

        `threshold` (t), `neighbourhood` (the size k of the set t is counted in, the node
        included) and `cohort` (the fewest clients in a decodable sum) must be recomputed
        by the client from what it verified, never read from the server's message.
        """
        if self.require_signatures and security != SECURE_SECURITY:
            raise PolicyRefusal("security", f"security={security} but {REQUIRE_SIGNATURES_KEY}"
                                            f" requires {SECURE_SECURITY}")
        if neighbourhood < 1 or not 1 <= threshold <= neighbourhood:
            raise PolicyRefusal("threshold", f"threshold {threshold} of a neighbourhood of "
                                             f"{neighbourhood}")
        fraction = threshold / neighbourhood
        if fraction <= THRESHOLD_FLOOR or fraction < self.min_threshold:
            raise PolicyRefusal(
                "threshold", f"t/k = {threshold}/{neighbourhood} = {fraction:.3f}: must be > "
                             f"{THRESHOLD_FLOOR} and >= {MIN_THRESHOLD_KEY}={self.min_threshold}")
        if cohort < self.min_cohort:
            raise PolicyRefusal("cohort", f"cohort of {cohort} < {MIN_COHORT_KEY}="
                                          f"{self.min_cohort}")

    def check_dp(self, *, name: str, noise_multiplier: float | None,
                 epsilon: float | None) -> None:
        """Refuse a round whose DP is weaker than the policy.

        `name` is the run's DP mode (none / local / distributed / central),
        `noise_multiplier` the one the round would use (None: unknown or no noise) and
        `epsilon` the ε this node would have spent after the round (None: not accounted).
        """
        if self.require_dp:
            if name == DP_NONE:
                raise PolicyRefusal("dp-required", f"dp={name} but {REQUIRE_DP_KEY}=true")
            if name == DP_CENTRAL and not self.trust_server_dp:
                raise PolicyRefusal(
                    "dp-required", f"dp=central leaves the clipped update un-noised; set "
                                   f"{TRUST_SERVER_DP_KEY}=true to accept it")
            if name not in DP_ON_NODE and name != DP_CENTRAL:
                raise PolicyRefusal("dp-required", f"unknown dp mode {name!r}")
        if name != DP_NONE and self.min_noise_multiplier is not None and (
                noise_multiplier is None or not noise_multiplier >= self.min_noise_multiplier):
            raise PolicyRefusal("dp-noise", f"noise multiplier {noise_multiplier} < "
                                            f"{MIN_NOISE_MULTIPLIER_KEY}="
                                            f"{self.min_noise_multiplier}")
        if self.max_epsilon is not None and epsilon is not None and (
                not epsilon <= self.max_epsilon):
            raise PolicyRefusal("dp-epsilon", f"epsilon {epsilon} > {MAX_EPSILON_KEY}="
                                              f"{self.max_epsilon}")

    def epsilon_budget(self, run_budget: float | None) -> float | None:
        """The tighter of the run's ε budget and this node's (None: unbounded)."""
        budgets = [b for b in (run_budget, self.max_epsilon) if b is not None]
        return min(budgets) if budgets else None

    def clear(self, metrics: Mapping[str, Any],
              required: Iterable[str] = ()) -> dict[str, Any]:
        """Only the metrics that may leave the node in the clear; log what was withheld.

        `required`: names the running protocol cannot work without (kept whatever the
        policy says; docs/policy.md lists them per protocol).
        """
        allowed = self.clear_metrics | frozenset(required)
        kept = {k: v for k, v in metrics.items() if k in allowed}
        withheld = sorted(set(metrics) - set(kept))
        if withheld:
            log.debug("policy %s keeps these metrics on the node: %s", CLEAR_METRICS_KEY,
                      ", ".join(withheld))
        return kept


# --------------------------------------------------------------------------- parsing


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "0"):
        return False
    raise PolicyError(f"{where}: {value!r} is not a boolean (true/false)")


def _as_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise PolicyError(f"{where}: {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PolicyError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise PolicyError(f"{where}: {value!r} is not a finite number")
    return number


def _as_names(value: Any, where: str) -> frozenset[str]:
    if isinstance(value, str):
        parts: Iterable[Any] = value.split(",")
    elif isinstance(value, list | tuple):
        parts = value
    else:
        raise PolicyError(f"{where}: {value!r} is not a comma-separated list of names")
    names = set()
    for part in parts:
        if not isinstance(part, str):
            raise PolicyError(f"{where}: {part!r} is not a name")
        if part.strip():
            names.add(part.strip())
    return frozenset(names)


def _threshold(value: Any, where: str) -> float:
    number = _as_float(value, where)
    if not 0 < number <= 1:
        raise PolicyError(f"{where}: {value!r} must be a fraction in (0, 1]")
    return number


def _cohort(value: Any, where: str) -> int:
    number = _as_float(value, where)
    if number != int(number) or number < SMALLEST_MIN_COHORT:
        raise PolicyError(f"{where}: {value!r} must be an integer >= {SMALLEST_MIN_COHORT}")
    return int(number)


def _epsilon(value: Any, where: str) -> float:
    number = _as_float(value, where)
    if number <= 0:
        raise PolicyError(f"{where}: {value!r} must be a positive number")
    return number


def _noise(value: Any, where: str) -> float:
    number = _as_float(value, where)
    if number < 0:
        raise PolicyError(f"{where}: {value!r} must be a non-negative number")
    return number


def _intersection(values: list[frozenset[str]]) -> frozenset[str]:
    result = values[0]
    for value in values[1:]:
        result = result & value
    return result


def _all_true(values: list[bool]) -> bool:
    return all(values)


def _any_true(values: list[bool]) -> bool:
    return any(values)


@dataclass(frozen=True)
class _Key:
    """One policy key: its field, parser, and how two sources combine (the stricter)."""

    field: str
    parse: Callable[[Any, str], Any]
    stricter: Callable[[list[Any]], Any]


_KEYS: dict[str, _Key] = {
    REQUIRE_AGGREGATION_KEY: _Key("allowed_aggregations", _as_names, _intersection),
    MIN_THRESHOLD_KEY: _Key("min_threshold", _threshold, max),
    MIN_COHORT_KEY: _Key("min_cohort", _cohort, max),
    REQUIRE_SIGNATURES_KEY: _Key("require_signatures", _as_bool, _any_true),
    REQUIRE_DP_KEY: _Key("require_dp", _as_bool, _any_true),
    TRUST_SERVER_DP_KEY: _Key("trust_server_dp", _as_bool, _all_true),
    MAX_EPSILON_KEY: _Key("max_epsilon", _epsilon, min),
    MIN_NOISE_MULTIPLIER_KEY: _Key("min_noise_multiplier", _noise, max),
    CLEAR_METRICS_KEY: _Key("clear_metrics", _as_names, _intersection),
}
#: Every key a policy may set (node config and policy file alike).
POLICY_KEYS = tuple(_KEYS)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def load_policy_file(path: Path) -> dict[str, Any]:
    """The parsed keys of a TOML policy file; PolicyError names the file and key/line."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise PolicyError(f"node config {POLICY_FILE_KEY}={path}: cannot read the policy "
                          f"file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path}: not valid TOML: {exc}") from exc
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        spec = _KEYS.get(key)
        if spec is None:
            raise PolicyError(f"policy file {path}: unknown key {key!r} (known: "
                              f"{', '.join(POLICY_KEYS)})")
        parsed[key] = spec.parse(value, f"policy file {path}: key {key!r}")
    return parsed


def _node_config_keys(node_config: Mapping[str, Any]) -> dict[str, Any]:
    parsed = {}
    for key, spec in _KEYS.items():
        value = node_config.get(key)
        if not _blank(value):
            parsed[key] = spec.parse(value, f"node config {key}")
    return parsed


def combine(sources: Iterable[Mapping[str, Any]], *, pins_roster: bool = False) -> NodePolicy:
    """One NodePolicy from parsed sources: a key set by several takes the stricter value."""
    collected: dict[str, list[Any]] = {}
    for source in sources:
        for key, value in source.items():
            collected.setdefault(key, []).append(value)
    fields: dict[str, Any] = {}
    for key, values in collected.items():
        spec = _KEYS[key]
        fields[spec.field] = spec.stricter(values)
    if "require_signatures" not in fields:
        fields["require_signatures"] = pins_roster
    allowed = fields.get("allowed_aggregations")
    if allowed is not None and not allowed:
        raise PolicyError(f"{REQUIRE_AGGREGATION_KEY}: no aggregation in common between the "
                          "node config and the policy file (or an empty list): the node would "
                          "refuse every round")
    return NodePolicy(**fields)


_CACHE: dict[tuple, NodePolicy] = {}


def policy_from_node_config(node_config: Mapping[str, Any]) -> NodePolicy:
    """The policy of a node config (inline keys and the `policy` file, stricter wins)."""
    file_value = node_config.get(POLICY_FILE_KEY)
    file_path = None if _blank(file_value) else Path(str(file_value)).expanduser()
    stamp: tuple = ()
    if file_path is not None:
        try:
            info = file_path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = ("missing",)  # load_policy_file raises the clear error
    key = (tuple(sorted((k, repr(node_config.get(k))) for k in (*POLICY_KEYS, ROSTER_NODE_KEY))),
           str(file_path), stamp)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    sources = [_node_config_keys(node_config)]
    if file_path is not None:
        sources.append(load_policy_file(file_path))
    policy = combine(sources, pins_roster=not _blank(node_config.get(ROSTER_NODE_KEY)))
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[key] = policy
    return policy


def node_policy(context: Any) -> NodePolicy:
    """This node's policy, from its own node config (never from the run's config)."""
    return policy_from_node_config(context.node_config)


def refusal_reply(msg: Any, refusal: PolicyRefusal) -> Any:
    """The Error reply of a refused message: fixed code and reason; the detail is logged."""
    from flwr.app import Error, Message

    log.warning("refusing %s by this node's policy (%s): %s", msg.metadata.message_type,
                refusal.code, refusal.detail)
    return Message(Error(code=POLICY_REFUSED_CODE, reason=refusal.reason), reply_to=msg)
