"""``dp=distributed``: the secure-aggregation input codec that adds the DP noise in the ring.

Client (``encode``): delta = w_k - w_global, clipped in L2 to C; rotated with the round's
public randomized Hadamard transform; scaled by gamma; conditionally rounded (L2 <= Delta2
always); plus this client's share of Skellam noise, variance mu / n_min; plus a count word 1.
What leaves the client is these words under the secure-aggregation masks: its update never
leaves without its noise share, and the server only ever unmasks the sum.

Server (``decode``): the unmasked ring sum as signed integers; the count word must equal the
number of survivors; the noise stays (that is the point); divide by gamma, undo the rotation,
drop the padding, divide by the survivors -> the mean clipped delta (+ noise); the new model
is w_global + server_learning_rate * mean delta. Each client counts once whatever its n_k:
client-level DP bounds each client's influence, which weighting by n_k would undo.

``check_survivors`` is the dropout line: fewer than n_min survivors would leave less noise
in the sum than planned, so the round must abort BEFORE unmasking (after unmasking the sum
has been seen). ``check_bounds`` refuses a sum no honest inputs can produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedstack.crypto.quantise import QuantisationError, ring_dtype, ring_reduce

from .accountant import SkellamRelease, epsilon
from .mechanism import MechanismSettings, SkellamPlan, plan_for
from .randomness import CryptoUniform
from .rotation import RandomizedHadamard, padded_dim
from .rounding import RoundingError, conditional_round
from .skellam import skellam

#: The DP mode's name (for the node policy's check_dp).
DP_NAME = "distributed"
#: Words after the rotated vector: the count (1 per client).
COUNT_WORDS = 1


class DistributedEncodeError(QuantisationError):
    """The client cannot encode its update (the secagg mod reports it as a soft dropout)."""


def _input_out_of_bounds(message: str) -> Exception:
    # Imported lazily: the primitives must import without the secagg package.
    from fedstack.strategies.secagg.errors import InputOutOfBounds

    return InputOutOfBounds(message)


def signed_words(ring_sum: np.ndarray, bits: int) -> np.ndarray:
    """Ring words as two's-complement signed integers (int64)."""
    t = np.asarray(ring_sum).astype(np.uint64) & np.uint64((1 << bits) - 1)
    signed = t.view(np.int64)
    if bits < 64:
        signed = signed - ((t >> np.uint64(bits - 1)).astype(np.int64) << bits)
    return signed


@dataclass(frozen=True)
class DistributedCodec:
    """The ``InputCodec`` of ``dp=distributed`` (see the module docstring)."""

    mechanism: MechanismSettings
    server_learning_rate: float = 1.0

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, base: Any = None) -> DistributedCodec:
        """From the run config (``cfg.dp``, ``cfg.aggregation``); ``base`` fixes the ring."""
        from .run_config import mechanism_settings

        settings = mechanism_settings(cfg)
        if base is not None and (base.bits, base.max_clients) != (
            settings.bits,
            settings.max_clients,
        ):
            raise ValueError("the secagg ring and the dp=distributed settings disagree")
        return cls(settings, float(cfg.dp.server_learning_rate))

    # -- the InputCodec interface ------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.mechanism.bits

    @property
    def max_clients(self) -> int:
        return self.mechanism.max_clients

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.bits)

    def plan(self, d: int) -> SkellamPlan:
        """The mechanism's parameters for a d-value model (cached; raises MechanismError)."""
        return plan_for(self.mechanism, int(d))

    def words(self, d: int) -> int:
        return padded_dim(int(d)) + COUNT_WORDS

    def encode(self, values: np.ndarray, weight: int, context: Any) -> np.ndarray:
        """Clip, rotate, scale, round, add this client's noise share, append the count."""
        global_values = getattr(context, "global_values", None)
        if global_values is None:
            raise DistributedEncodeError(
                "dp=distributed encodes the update's delta: the codec context lacks the "
                "global model"
            )
        v = np.asarray(values, dtype=np.float64).ravel()
        g = np.asarray(global_values, dtype=np.float64).ravel()
        if v.shape != g.shape:
            raise DistributedEncodeError(
                f"update has {v.size} values, the global model {g.size}"
            )
        if not (np.isfinite(v).all() and np.isfinite(g).all()):
            raise DistributedEncodeError("update or global model contains NaN or inf values")
        plan = self.plan(v.size)
        expected = int(context.expected_survivors)
        client_variance = plan.client_variance(expected)
        if not client_variance > 0:  # never send an unnoised update
            raise DistributedEncodeError("refusing to encode without noise")
        delta = v - g
        norm = float(np.linalg.norm(delta))
        if norm > self.mechanism.clip:
            delta *= self.mechanism.clip / norm
        rotation = RandomizedHadamard(v.size, bytes(context.seed), int(context.round_num))
        scaled = rotation.forward(delta) * plan.scale
        rng = CryptoUniform()
        try:
            rounded = conditional_round(scaled, plan.l2_sensitivity, rng)
        except RoundingError as exc:
            raise DistributedEncodeError(str(exc)) from exc
        out = np.empty(plan.padded_dim + COUNT_WORDS, dtype=np.int64)
        out[: plan.padded_dim] = rounded + skellam(client_variance, plan.padded_dim, rng)
        out[-1] = 1
        words = out.view(np.uint64)  # two's complement: reduction mod 2^64
        if self.dtype == np.uint32:
            words = words.astype(np.uint32)
        return ring_reduce(words, self.bits)

    def policy_terms(self, d: int, round_num: int) -> dict[str, Any]:
        """What a node's policy checks before it contributes to round ``round_num``:
        ``NodePolicy.check_dp(**codec.policy_terms(d, r))``. Computed by the client from the
        run config, never read from the server: the noise multiplier z (relative to the
        rounded sensitivity, the one accounted) and epsilon after r released rounds (every
        round up to r counted: an upper bound when some aborted before unmasking)."""
        plan = self.plan(d)
        release = plan.release()
        spent = epsilon(
            [SkellamRelease(release.variance, release.l2_sensitivity, release.l1_sensitivity,
                            max(1, int(round_num)))],
            self.mechanism.delta,
        )
        return {"name": DP_NAME, "noise_multiplier": plan.noise_multiplier, "epsilon": spent}

    def check_survivors(self, survivors: int, expected: int) -> None:
        """Raise unless ``survivors`` noise shares add up to the planned variance.

        Call BEFORE unmasking (server: when closing the masked-input stage; client: before
        answering an unmask request whose survivor set it can see).
        """
        d_any = 1  # min_survivors depends only on the slack
        needed = self.plan(d_any).min_survivors(int(expected))
        if survivors < needed:
            raise _input_out_of_bounds(
                f"{survivors} masked inputs arrived of {expected} expected: below the "
                f"{needed} whose noise shares make the planned DP noise "
                f"(dp.dropout_slack={self.mechanism.dropout_slack:g}); not unmasking"
            )

    def _plan_of_sum(self, ring_sum: np.ndarray) -> SkellamPlan:
        n = np.asarray(ring_sum).size - COUNT_WORDS
        if n < 1 or padded_dim(n) != n:
            raise _input_out_of_bounds(f"ring sum of {n + COUNT_WORDS} words is not d' + 1")
        return self.plan(n)  # d' itself: the plan depends on d only through d'

    def check_bounds(self, ring_sum: np.ndarray, survivors: int) -> None:
        """Refuse a sum whose count or coordinates honest inputs cannot produce."""
        signed = signed_words(ring_sum, self.bits)
        count = int(signed[-1])
        if count != int(survivors):
            raise _input_out_of_bounds(
                f"count word of the sum is {count}, not the {survivors} survivors: a client "
                "sent an out-of-range input"
            )
        plan = self._plan_of_sum(ring_sum)
        limit = plan.sum_bound(int(survivors))
        if signed.size > 1 and float(np.abs(signed[:-1]).max()) > limit:
            raise _input_out_of_bounds(
                "a coordinate of the noisy sum lies outside what clipped, rounded inputs "
                f"plus the noise can produce (|sum| <= {limit:.6g}): a client offset its words"
            )

    def decode_delta(self, ring_sum: np.ndarray, survivors: int, context: Any) -> np.ndarray:
        """The noisy mean clipped delta (length d) from the unmasked sum."""
        global_values = getattr(context, "global_values", None)
        if global_values is None:
            raise ValueError("dp=distributed decodes a delta: pass the round's CodecContext")
        d = int(np.asarray(global_values).size)
        signed = signed_words(ring_sum, self.bits)
        count = int(signed[-1])
        if count != int(survivors) or count < 1:
            raise _input_out_of_bounds(f"count word {count} != {survivors} survivors")
        plan = self.plan(d)
        if signed.size != plan.padded_dim + COUNT_WORDS:
            raise _input_out_of_bounds(
                f"ring sum has {signed.size} words, expected {plan.padded_dim + COUNT_WORDS}"
            )
        rotation = RandomizedHadamard(d, bytes(context.seed), int(context.round_num))
        total = rotation.inverse(signed[:-1].astype(np.float64) / plan.scale)
        return total / count

    def decode(
        self, ring_sum: np.ndarray, survivors: int, context: Any = None
    ) -> tuple[np.ndarray, int]:
        """(w_global + server_lr * noisy mean delta, number of clients summed)."""
        if context is None:
            raise ValueError(
                "dp=distributed decodes a delta: decode needs the round's CodecContext "
                "(global model, public seed, round)"
            )
        delta = self.decode_delta(ring_sum, survivors, context)
        new = np.asarray(context.global_values, dtype=np.float64).ravel() + (
            self.server_learning_rate * delta
        )
        return new, int(survivors)
