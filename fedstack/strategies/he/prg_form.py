"""fedstack's seeded uplink form ("prg"): c0 byte-packed, c1 expanded from a public AES key.

Why not SEAL's own seeded ciphertexts: SEAL expands a seed with BLAKE2xb (its reference C
build, ~270 MB/s here), and the server must expand every reply's c1 to add it: at 16 bytes
per parameter per client that alone costs ~60 ns per parameter and client, several times the
whole rest of a limb-wise sum, and it capped the server at ~3x NVFlare's speed. AES-CTR with
AES-NI expands the same c1 at GB/s, in one call per block of ciphertexts.

The form, for a context with N coefficients and data primes q_j (bits b_j, w_j = ceil(b_j/8)
bytes): each ciphertext is one chunk `key (32 bytes) || c0`, c0 limb by limb, each coefficient
w_j little-endian bytes. Its c1 is uniform mod q_j from AES-256-CTR under `key`: ciphertext i
(the chunk's index in its message) takes the keystream from counter block
i * L * N * 8 / 16 (128-bit big-endian), as L * N little-endian u64 words, limb by limb; a
word w gives the coefficient w >> (64 - b_j), accepted if below q_j. A rejected coefficient
(probability ~2^-37 for SEAL's primes, which sit just below 2^b_j) takes the next accepted
value of the spare stream of (i, j), which starts at counter 2^127 + (i * L + j) * 2^32.
The key is public (as SEAL's seed is): c1 only has to be uniform and independent of the
secret key, which is how Kyber's AES variant expands its public matrix. The client picks a
fresh random key per reply (`ckks.encrypt_update`) and shares it across the reply's chunks.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedstack.strategies.he.seal_io import write_low_bytes

KEY_BYTES = 32
AES_BLOCK = 16
WORD_BYTES = 8
SPARE_BASE = 1 << 127
SPARE_STRIDE = 1 << 32
COUNTER_BYTES = 16


def widths(primes: tuple[int, ...]) -> tuple[int, ...]:
    """Bytes per c0 coefficient for each prime."""
    return tuple(math.ceil(q.bit_length() / 8) for q in primes)


def chunk_len(n: int, primes: tuple[int, ...]) -> int:
    return KEY_BYTES + n * sum(widths(primes))


def _counter(block: int) -> bytes:
    return block.to_bytes(COUNTER_BYTES, "big")


class PrgExpander:
    """c1 of a run of ciphertexts under one key, reusing its buffers between calls."""

    def __init__(self, n: int, primes: tuple[int, ...], max_ciphertexts: int) -> None:
        self.n = n
        self.primes = primes
        self.limbs = len(primes)
        self.bits = [q.bit_length() for q in primes]
        self._q = np.array(primes, dtype=np.uint64).reshape(1, -1, 1)
        self.ct_bytes = self.limbs * n * WORD_BYTES
        if self.ct_bytes % AES_BLOCK:
            raise ValueError("a ciphertext's c1 must be whole AES blocks")
        size = max_ciphertexts * self.ct_bytes
        self._zeros = bytes(size)
        # cryptography's update_into wants one block of slack in the output buffer.
        self._out = bytearray(size + AES_BLOCK)
        self._words = np.frombuffer(self._out, dtype="<u8", count=size // WORD_BYTES)

    def c1(self, key: bytes, first: int, out: np.ndarray) -> None:
        """Write c1 of ciphertexts first.. (out: (count, L, N) uint64) for one shared key."""
        count = out.shape[0]
        size = count * self.ct_bytes
        enc = Cipher(algorithms.AES(key), modes.CTR(_counter(first * self.ct_bytes // AES_BLOCK)))
        enc.encryptor().update_into(memoryview(self._zeros)[:size], self._out)
        words = self._words[: size // WORD_BYTES].reshape(count, self.limbs, self.n)
        for j, b in enumerate(self.bits):
            np.right_shift(words[:, j], np.uint64(64 - b), out=out[:, j])
            if int(out[:, j].max()) >= self.primes[j]:  # rare: one fast pass decides
                for k in np.flatnonzero((out[:, j] >= self._q[0, j]).any(axis=1)):
                    self._respare(key, first + int(k), j, out[k, j])

    def _respare(self, key: bytes, index: int, limb: int, row: np.ndarray) -> None:
        """Replace rejected coefficients of (ciphertext index, limb) from its spare stream."""
        q, shift = self.primes[limb], np.uint64(64 - self.bits[limb])
        start = SPARE_BASE + (index * self.limbs + limb) * SPARE_STRIDE
        enc = Cipher(algorithms.AES(key), modes.CTR(_counter(start))).encryptor()
        spare: list[int] = []
        for i in np.flatnonzero(row >= np.uint64(q)):
            while True:
                if not spare:
                    block = np.frombuffer(enc.update(bytes(AES_BLOCK * 64)), dtype="<u8")
                    spare = [int(v) for v in (block >> shift)][::-1]
                value = spare.pop()
                if value < q:
                    row[i] = value
                    break


def unpack_c0(
    buf: np.ndarray,
    start: int,
    count: int,
    stride: int,
    n: int,
    primes: tuple[int, ...],
    out: np.ndarray,
) -> None:
    """c0 of `count` chunks into out ((count, L, N) uint64).

    `buf` is a contiguous 1-D uint8 array holding the chunks at `start`, `stride` bytes apart.
    Each coefficient is read as an unaligned little-endian 8-byte word at its offset and
    masked to its width (one NumPy pass); the final chunk of `buf`, whose last word would
    read past the end, goes through an 8-byte padded copy.
    """
    ws = widths(primes)
    last = KEY_BYTES + n * sum(ws) - ws[-1] + WORD_BYTES  # bytes a chunk's reads span
    if count and start + (count - 1) * stride + last > buf.size:
        if count > 1:
            unpack_c0(buf, start, count - 1, stride, n, primes, out[: count - 1])
        padded = np.zeros(stride + WORD_BYTES, dtype=np.uint8)
        row = start + (count - 1) * stride
        padded[:stride] = buf[row : row + stride]
        unpack_c0(padded, 0, 1, stride, n, primes, out[count - 1 :])
        return
    offset = start + KEY_BYTES
    for j, w in enumerate(ws):
        view = np.ndarray(
            shape=(count, n), dtype="<u8", buffer=buf, offset=offset, strides=(stride, w)
        )
        np.bitwise_and(view, np.uint64((1 << (8 * w)) - 1), out=out[:, j])
        offset += n * w


def pack_c0(c0: np.ndarray, primes: tuple[int, ...]) -> np.ndarray:
    """(count, L, N) uint64 -> (count, N * sum(w_j)) uint8, limb by limb, little-endian."""
    count, _, n = c0.shape
    ws = widths(primes)
    out = np.empty((count, n * sum(ws)), dtype=np.uint8)
    offset = 0
    for j, w in enumerate(ws):
        write_low_bytes(out[:, offset : offset + n * w], c0[:, j], w)
        offset += n * w
    return out


class ShoupMultiplier:
    """x -> x * w mod q for a fixed (L, N) array w, on uint64 arrays (Shoup's method).

    With w' = floor(w * 2^64 / q) precomputed, q_hat = floor(x * w' / 2^64) is the quotient of
    x * w / q or one less, so x * w - q_hat * q, computed mod 2^64, lies in [0, 2q): one
    conditional subtraction finishes. NumPy has no 64x64 -> 128-bit product, so the high half
    is assembled from 32-bit pieces. Needs q < 2^63 (SEAL's primes have at most 60 bits).
    Used by the client to move a SEAL ciphertext onto the AES-expanded c1 (`ckks`).
    """

    def __init__(self, w: np.ndarray, primes: tuple[int, ...]) -> None:
        self.w = np.ascontiguousarray(w, dtype=np.uint64)
        self.q = np.array(primes, dtype=np.uint64).reshape(-1, 1)
        self.w_shoup = np.array(
            [[(int(v) << 64) // q for v in row] for row, q in zip(self.w, primes, strict=True)],
            dtype=np.uint64,
        )

    def mul(self, x: np.ndarray) -> np.ndarray:
        """x * w mod q for x of shape (..., L, N) with entries below q."""
        q_hat = _mulhi(x, self.w_shoup)
        r = x * self.w - q_hat * self.q  # both products wrap mod 2^64: the difference is exact
        r -= np.where(r >= self.q, self.q, np.uint64(0))
        return r


_LOW32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def _mulhi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The high 64 bits of the 128-bit products x * y (uint64, elementwise)."""
    x0, x1 = x & _LOW32, x >> _32
    y0, y1 = y & _LOW32, y >> _32
    p01, p10 = x0 * y1, x1 * y0
    mid = ((x0 * y0) >> _32) + (p01 & _LOW32) + (p10 & _LOW32)
    return x1 * y1 + (p01 >> _32) + (p10 >> _32) + (mid >> _32)
