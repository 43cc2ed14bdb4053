"""Where DP-SGD's randomness comes from: torch's generator, or AES-256-CTR (`dp.secure_rng`).

Why this matters: the Gaussian noise and the Poisson sampling are DP-SGD's secret. Anyone who
can predict them can subtract the noise from a released update. torch's CPU generator is a
Mersenne Twister: seeded from the OS (`secrets`, never from the run seed the server knows),
but not cryptographically secure; its state follows from 624 consecutive outputs. With
`dp.secure_rng=true` every random bit comes instead from AES-256 in counter mode, keyed with
256 fresh bits from the OS per client and round: the PRG construction secure aggregation
uses. The cost is a slower Gaussian draw (measured in benchmarks/dp.py).

Both sources offer the two draws DP-SGD needs, behind one small interface
(:class:`RandomSource`): uniform numbers for Poisson inclusion and in-place Gaussian noise.

Gaussian samples of :class:`AesCtrRandom` use Box-Muller with a 53-bit uniform for the
radius, so the tails reach 8.5σ (24-bit float uniforms stop at 5.8σ), and a 24-bit uniform
for the angle. What it does not address: attacks on the low-order bits of floating-point
Gaussian samples (Mironov 2012), which Opacus's ``secure_mode`` mitigates by summing samples;
see docs/dp.md.
"""

from __future__ import annotations

import math
import secrets
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import Tensor

#: AES-256 key size: the PRG is keyed by the full 256-bit secret.
AES_KEY_BYTES = 32
#: AES block size; also the counter-mode nonce size (all zero: every key is fresh).
AES_BLOCK_BYTES = 16
#: Bits of a float64 uniform (its mantissa): u = (w >> 11) / 2**53.
UNIFORM_BITS = 53
#: Bits of the Box-Muller angle's uniform (a float32 mantissa).
ANGLE_BITS = 24


class RandomSource(Protocol):
    """The random draws DP-SGD makes."""

    def uniform(self, shape: tuple[int, ...]) -> Tensor:
        """Independent uniforms in [0, 1)."""
        ...

    def normal_(self, out: Tensor, std: float) -> Tensor:
        """Fill ``out`` in place with independent N(0, std^2) samples; return it."""
        ...


class TorchRandom:
    """A torch generator behind the :class:`RandomSource` interface (the default source)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def uniform(self, shape: tuple[int, ...]) -> Tensor:
        return torch.rand(shape, generator=self.generator)

    def normal_(self, out: Tensor, std: float) -> Tensor:
        return out.normal_(0.0, std, generator=self.generator)


class AesCtrRandom:
    """A cryptographically secure :class:`RandomSource`: the AES-256-CTR keystream."""

    def __init__(self, key: bytes | None = None) -> None:
        key = secrets.token_bytes(AES_KEY_BYTES) if key is None else key
        if len(key) != AES_KEY_BYTES:
            raise ValueError(f"AES-256 needs a {AES_KEY_BYTES}-byte key, got {len(key)} bytes")
        cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(AES_BLOCK_BYTES)))
        self._encryptor = cipher.encryptor()
        self._zeros = b""

    def words(self, count: int) -> Tensor:
        """``count`` uniform 64-bit words (as int64 bit patterns) from the keystream."""
        nbytes = 8 * count
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
        out = bytearray(nbytes + AES_BLOCK_BYTES - 1)  # update_into's required slack
        self._encryptor.update_into(memoryview(self._zeros)[:nbytes], out)
        return torch.from_numpy(np.frombuffer(out, dtype=np.int64, count=count))

    def _top_bits(self, words: Tensor, bits: int) -> Tensor:
        # Arithmetic shift of a signed word, then a mask: the top `bits` bits, unsigned.
        return (words >> (64 - bits)) & ((1 << bits) - 1)

    def uniform(self, shape: tuple[int, ...]) -> Tensor:
        count = math.prod(shape)
        bits = self._top_bits(self.words(count), UNIFORM_BITS)
        return bits.to(torch.float64).mul_(2.0**-UNIFORM_BITS).reshape(shape)

    def normal_(self, out: Tensor, std: float) -> Tensor:
        count = out.numel()
        pairs = (count + 1) // 2
        words = self.words(2 * pairs)
        # Radius from u in (0, 1] (the +1 keeps log away from zero), in float64.
        u = self._top_bits(words[:pairs], UNIFORM_BITS).to(torch.float64)
        radius = u.add_(1.0).mul_(2.0**-UNIFORM_BITS).log_().mul_(-2.0).sqrt_().mul_(std)
        radius = radius.to(out.dtype)
        angle = self._top_bits(words[pairs:], ANGLE_BITS).to(out.dtype)
        angle.mul_(2.0 * math.pi * 2.0**-ANGLE_BITS)
        samples = torch.empty(2 * pairs, dtype=out.dtype)
        torch.mul(radius, torch.cos(angle), out=samples[:pairs])
        torch.mul(radius, angle.sin_(), out=samples[pairs:])
        out.copy_(samples[:count].view(out.shape))
        return out


def as_random_source(source: torch.Generator | RandomSource) -> RandomSource:
    """Accept a bare torch generator wherever a RandomSource is expected."""
    return TorchRandom(source) if isinstance(source, torch.Generator) else source
