"""Named CKKS parameter sets for encrypted averaging, and the capacity check that guards them.

Averaging needs ciphertext additions only: clients pre-scale their update by their weight n_k,
encrypt (n_k * w_k, n_k), the server adds, a key holder decrypts and divides. No
multiplication means no rescaling, so the modulus chain needs exactly one data prime. The bytes
on the wire scale with the bits of the data primes (not with N), so a single ~55-bit data
prime is both the smallest and the most precise choice within the byte budget, and it is why
our ciphertexts are about half of NVIDIA FLARE's (N=8192, [60, 40, 40], scale 2^40: 100 data
bits per coefficient).

SEAL (which TenSEAL wraps) treats the last prime of a chain with more than one prime as the
key-switching "special" prime: it is part of the keys, never of a ciphertext. With N=2048 the
128-bit bound (54 bits in all) leaves room for one prime only, and SEAL then runs without key
switching; with N=4096 the second prime is the unused special prime.

Precision model (see `noise_bound`): a fresh symmetric CKKS encryption adds to every
coefficient a rounded Gaussian error (sigma 3.2, SEAL's default) plus the encoder's rounding
(uniform in +-1/2). Decoding maps a coefficient error of variance v to a slot error of variance
N*v/2 (real part of a sum of N terms of unit modulus); K ciphertexts add independently. We use
eight standard deviations as the bound: the chance that one slot exceeds it is ~1e-15, so even
10^9 parameters stay inside it. Tests check measured errors against this bound.

Overflow model (see `check_capacity`): the coefficients of a CKKS plaintext are bounded by
scale * max|slot| (inverse canonical embedding of N/2 slots, real inputs), so the sum over
`max_clients` replies of values up to `max_weight * max_abs_value` (and the weight slot, up to
`max_weight`) must satisfy scale * that + noise < q/2, else decryption wraps around silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Largest total coefficient-modulus bit count for 128-bit classical security, ternary secret,
# per the HomomorphicEncryption.org security standard (2018), table for 128 bits; SEAL enforces
# the same numbers (`CoeffModulus.MaxBitCount(N, tc128)`).
HE_STANDARD_MAX_COEFF_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

# SEAL's error distribution (noise_standard_deviation in seal/util/defines.h).
NOISE_STDDEV = 3.2
# Variance of the encoder's rounding of one coefficient (uniform on [-1/2, 1/2]).
ENCODE_ROUNDING_VARIANCE = 1.0 / 12.0
# Standard deviations in the per-slot error bound: P(|N(0,1)| > 8) ~ 1.2e-15.
NOISE_BOUND_SIGMAS = 8.0
# Safety factor on the overflow check: float64 pre-scaling and encoder rounding are far below
# this, it only keeps the check from being tight to the last bit.
OVERFLOW_MARGIN = 1.0 + 2.0**-8
# Seeded ciphertexts need SEAL's PRNG info and a compressed header; the packed downlink adds
# one float64 per ciphertext. Bytes per parameter are reported by the benchmark, not assumed.

DEFAULT_PRESET = "standard"


@dataclass(frozen=True)
class CKKSPreset:
    """One named CKKS parameter set.

    `coeff_modulus_bits` is the whole chain handed to SEAL; `data_bits` is what a ciphertext
    carries (all but the special prime when there is more than one prime).
    """

    name: str
    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int
    description: str

    @property
    def slots(self) -> int:
        """Values per ciphertext: CKKS packs N/2 complex slots; we use them as reals."""
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> tuple[int, ...]:
        """Bit sizes of the primes a ciphertext lives under (SEAL's first data level)."""
        bits = self.coeff_modulus_bits
        return bits if len(bits) == 1 else bits[:-1]

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_modulus_bits)

    def check_security(self) -> None:
        """Raise ValueError unless this preset is 128-bit secure by the HE standard's table."""
        limit = HE_STANDARD_MAX_COEFF_BITS_128.get(self.poly_modulus_degree)
        if limit is None:
            raise ValueError(
                f"preset {self.name!r}: poly_modulus_degree={self.poly_modulus_degree} "
                f"is not one of {sorted(HE_STANDARD_MAX_COEFF_BITS_128)}"
            )
        if self.total_bits > limit:
            raise ValueError(
                f"preset {self.name!r}: coefficient modulus {list(self.coeff_modulus_bits)} "
                f"has {self.total_bits} bits; 128-bit security allows at most {limit} "
                f"for N={self.poly_modulus_degree}"
            )
        if any(b > 60 or b < 14 for b in self.coeff_modulus_bits):
            raise ValueError(
                f"preset {self.name!r}: SEAL primes must have 14..60 bits, "
                f"got {list(self.coeff_modulus_bits)}"
            )


PRESETS: dict[str, CKKSPreset] = {
    p.name: p
    for p in (
        CKKSPreset(
            name="compact",
            poly_modulus_degree=2048,
            coeff_modulus_bits=(54,),
            scale_bits=29,
            description="N=2048, one 54-bit prime (no key switching): smallest messages, "
            "lowest latency per ciphertext; ~1 bit less precision than 'standard'.",
        ),
        CKKSPreset(
            name="standard",
            poly_modulus_degree=4096,
            coeff_modulus_bits=(55, 54),
            scale_bits=30,
            description="N=4096, 55-bit data prime (+54-bit special prime): the default; "
            "fewest ciphertexts per parameter at the byte budget (<=16 B up, <=28 B down).",
        ),
        CKKSPreset(
            name="precise",
            poly_modulus_degree=4096,
            coeff_modulus_bits=(60, 49),
            scale_bits=35,
            description="N=4096, 60-bit data prime: 5 more bits of precision/headroom for "
            "~9% more bytes than 'standard'.",
        ),
    )
}


def get_preset(name: str) -> CKKSPreset:
    """Look a preset up by name with an error that lists the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown CKKS preset {name!r}; choose one of {sorted(PRESETS)}") from None


def noise_bound(poly_modulus_degree: int, num_ciphertexts: int) -> float:
    """High-probability bound on |error| of one decoded slot of a sum of fresh ciphertexts.

    In units of the plaintext times the scale (divide by the scale for value units).
    """
    variance = (NOISE_STDDEV**2 + ENCODE_ROUNDING_VARIANCE) * num_ciphertexts
    return NOISE_BOUND_SIGMAS * math.sqrt(poly_modulus_degree * variance / 2.0)


@dataclass(frozen=True)
class Capacity:
    """What a preset guarantees for given bounds (numbers for the docs and the privacy report)."""

    scale_bits: int
    max_scale_bits: int  # largest scale that still cannot overflow
    headroom_bits: float  # log2(q/2) - log2(scale * largest possible slot value)
    worst_abs_error: float  # bound on |error| of an averaged value when the total weight is 1


def largest_slot_value(max_clients: int, max_weight: float, max_abs_value: float) -> float:
    """Largest |slot| of the encrypted sum: every client at max weight and max magnitude.

    The weight slot holds sum(n_k) <= max_clients * max_weight, hence the max(..., 1).
    """
    return max_clients * max_weight * max(max_abs_value, 1.0)


def max_safe_scale_bits(
    *, data_prime: int, max_clients: int, max_weight: float, max_abs_value: float
) -> int:
    """The largest log2(scale) at which the sum over the bounds cannot wrap around."""
    slot_max = largest_slot_value(max_clients, max_weight, max_abs_value)
    coeff_noise = max_clients * (6.0 * NOISE_STDDEV + 1.0)
    return math.floor(math.log2((data_prime / 2.0 - coeff_noise) / (slot_max * OVERFLOW_MARGIN)))


def check_capacity(
    preset: CKKSPreset,
    *,
    scale_bits: int,
    data_prime: int,
    max_clients: int,
    max_weight: float,
    max_abs_value: float,
) -> Capacity:
    """Raise ValueError if the sum over the bounds could wrap around or lose the weight.

    `data_prime` is the actual data prime (slightly below 2^bits). With more than one data prime
    the smallest bound is the product; all our presets have one.
    """
    if max_clients < 1 or max_weight < 1 or max_abs_value <= 0:
        raise ValueError("max_clients and max_weight must be >= 1 and max_abs_value > 0")
    scale = 2.0**scale_bits
    slot_max = largest_slot_value(max_clients, max_weight, max_abs_value)
    half_q = data_prime / 2.0
    # Coefficient noise of a sum is tiny next to scale * slot_max; bound it generously anyway.
    coeff_noise = max_clients * (6.0 * NOISE_STDDEV + 1.0)
    needed = scale * slot_max * OVERFLOW_MARGIN + coeff_noise
    max_scale_bits = max_safe_scale_bits(
        data_prime=data_prime,
        max_clients=max_clients,
        max_weight=max_weight,
        max_abs_value=max_abs_value,
    )
    if needed >= half_q:
        raise ValueError(
            f"CKKS overflow: {max_clients} clients x weight {max_weight:g} x |value| "
            f"{max_abs_value:g} at scale 2^{scale_bits} needs {math.log2(needed):.2f} bits but "
            f"preset {preset.name!r} has {math.log2(half_q):.2f}; lower scale_bits to "
            f"<= {max_scale_bits} or lower max_clients/max_weight/max_abs_value"
        )
    bound = noise_bound(preset.poly_modulus_degree, max_clients) / scale
    if bound >= 0.25:
        raise ValueError(
            f"CKKS precision: scale 2^{scale_bits} is too small to recover the total weight "
            f"exactly (error bound {bound:.3g} >= 0.25); raise scale_bits"
        )
    return Capacity(
        scale_bits=scale_bits,
        max_scale_bits=max_scale_bits,
        headroom_bits=math.log2(half_q) - math.log2(scale * slot_max),
        worst_abs_error=bound,
    )
