"""SEAL's seeded uniform polynomial (the `c1` of a seeded ciphertext), recomputed from its seed.

Why: a seeded symmetric ciphertext carries a 64-byte seed instead of its uniformly random
polynomial `c1`; the server's sum is a full ciphertext, so it needs every reply's `c1`.
Recomputing it here (instead of loading each ciphertext through SEAL) is what lets the server
add whole replies as arrays. The result must be bit-for-bit SEAL's (tests compare against
SEAL's own expansion for both PRNG types):

- SEAL's PRNG (`UniformRandomGenerator`, SEAL 4.x) emits 4096-byte blocks; block i is
  BLAKE2xb(key=seed, data=u64le(i), 4096 bytes) or SHAKE256(seed || u64le(i), 4096 bytes).
- `sample_poly_uniform` takes the first L*N words (little-endian uint64, limb by limb); in limb
  j a word >= `max_multiple(q_j)` is redrawn from the stream's next words (repeatedly, in limb
  then coefficient order) and every word is then reduced mod q_j.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from fedstack.strategies.he.seal_native import SealNative

#: `prng_type` values in SEAL's UniformRandomGeneratorInfo.
PRNG_BLAKE2XB = 1
PRNG_SHAKE256 = 2
PRNG_TYPES = (PRNG_BLAKE2XB, PRNG_SHAKE256)
#: SEAL's PRNG buffer (bytes generated per refill) and its seed size.
PRNG_BLOCK_BYTES = 4096
PRNG_SEED_BYTES = 64
WORD_BYTES = 8
WORDS_PER_BLOCK = PRNG_BLOCK_BYTES // WORD_BYTES
U64_MAX = 2**64 - 1
_COUNTER = struct.Struct("<Q")


def max_multiple(prime: int) -> int:
    """SEAL's rejection threshold: words >= this are redrawn (keeps `word % prime` uniform)."""
    return U64_MAX - U64_MAX % prime - 1


class SeedExpander:
    """Fills arrays with SEAL's PRNG stream for a seed (BLAKE2xb natively, SHAKE256 hashlib)."""

    def __init__(self, lib: SealNative | None) -> None:
        self.lib = lib

    def supports(self, prng_type: int) -> bool:
        return prng_type == PRNG_SHAKE256 or (prng_type == PRNG_BLAKE2XB and self.lib is not None)

    def stream(self, prng_type: int, seed: bytes, out: np.ndarray, first_block: int = 0) -> None:
        """Write stream blocks first_block.. into `out` (contiguous uint64, whole blocks)."""
        if out.dtype != np.uint64 or not out.flags.c_contiguous or out.size % WORDS_PER_BLOCK:
            raise ValueError("out must be contiguous uint64 holding whole PRNG blocks")
        blocks = out.size // WORDS_PER_BLOCK
        if prng_type == PRNG_BLAKE2XB:
            if self.lib is None:
                raise ValueError("BLAKE2xb is not available in this TenSEAL build")
            addr = out.ctypes.data
            for b in range(blocks):
                self.lib.blake2xb(
                    addr + b * PRNG_BLOCK_BYTES,
                    PRNG_BLOCK_BYTES,
                    _COUNTER.pack(first_block + b),
                    seed,
                )
        elif prng_type == PRNG_SHAKE256:
            raw = out.view(np.uint8)
            for b in range(blocks):
                digest = hashlib.shake_256(seed + _COUNTER.pack(first_block + b))
                raw[b * PRNG_BLOCK_BYTES : (b + 1) * PRNG_BLOCK_BYTES] = np.frombuffer(
                    digest.digest(PRNG_BLOCK_BYTES), dtype=np.uint8
                )
        else:
            raise ValueError(f"unknown SEAL PRNG type {prng_type}")

    def uniform(self, prng_type: int, seed: bytes, primes: tuple[int, ...], n: int) -> np.ndarray:
        """SEAL's `sample_poly_uniform` for one seed: (L, N) uint64, limb j reduced mod q_j."""
        words = np.empty((len(primes), n), dtype=np.uint64)
        self.stream(prng_type, seed, words.reshape(-1))
        self.redraw(prng_type, seed, words, primes)
        np.remainder(words, np.array(primes, dtype=np.uint64).reshape(-1, 1), out=words)
        return words

    def redraw(
        self, prng_type: int, seed: bytes, words: np.ndarray, primes: tuple[int, ...]
    ) -> None:
        """Replace rejected words of one ciphertext's (L, N) bulk in place, as SEAL does.

        The redraws continue the stream right after the bulk; rare (probability below
        2^-9 per word for 55-bit primes, far less for SEAL's usual primes).
        """
        n = words.shape[1]
        bulk_words = len(primes) * n
        if bulk_words % WORDS_PER_BLOCK:
            raise ValueError("the bulk must be whole PRNG blocks (N >= 512)")
        extra = np.empty(0, dtype=np.uint64)
        pos = 0
        next_block = bulk_words // WORDS_PER_BLOCK
        for j, prime in enumerate(primes):
            limit = np.uint64(max_multiple(prime))
            if words[j].max() < limit:  # the usual case, one fast pass
                continue
            for i in np.flatnonzero(words[j] >= limit):
                while True:
                    if pos == extra.size:
                        extra = np.empty(WORDS_PER_BLOCK, dtype=np.uint64)
                        self.stream(prng_type, seed, extra, next_block)
                        next_block += 1
                        pos = 0
                    word = extra[pos]
                    pos += 1
                    if word < limit:
                        words[j, i] = word
                        break
