"""Pseudo-random generator: a 256-bit key expanded into uniform machine words.

Why a stream cipher: AES-256-CTR (AES-NI) or ChaCha20 keystream *is* a cryptographic PRG, and
``cryptography`` produces it at GB/s straight into a buffer that NumPy views without a copy.
Each key expands exactly one stream (keys are derived per purpose and round), so a constant
nonce is safe: the (key, nonce) pair never repeats.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PrgName = Literal["aes", "chacha20"]
PRG_ALGORITHMS: tuple[str, ...] = ("aes", "chacha20")
PRG_KEY_BYTES = 32
PRG_NONCE = bytes(16)
"""Constant nonce/initial counter: sound because each derived key expands a single stream."""

ACCUMULATE_BLOCK_BYTES = 1 << 18
"""Keystream bytes per step of :func:`accumulate`: 256 KiB keeps the keystream block and the
matching slice of the running sum in L2 while every stream is added to it, instead of
writing a d-word keystream to memory and reading it back once per stream (measured best of
64 KiB .. 1 MiB at d = 1e6; smaller blocks pay more Python calls per stream)."""


def _keystream_cipher(key: bytes, algorithm: str) -> Cipher:
    if len(key) != PRG_KEY_BYTES:
        raise ValueError(f"PRG key must be {PRG_KEY_BYTES} bytes, got {len(key)}")
    if algorithm == "aes":
        return Cipher(algorithms.AES(key), modes.CTR(PRG_NONCE))
    if algorithm == "chacha20":
        return Cipher(algorithms.ChaCha20(key, PRG_NONCE), mode=None)
    raise ValueError(f"unknown PRG {algorithm!r}; expected one of {PRG_ALGORITHMS}")


def expand_bytes(key: bytes, num_bytes: int, algorithm: str = "aes") -> bytes:
    """``num_bytes`` of keystream (encryption of zeros) under ``key``."""
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
    enc = _keystream_cipher(key, algorithm).encryptor()
    return enc.update(bytes(num_bytes)) + enc.finalize()


def _word_dtype(dtype: np.dtype | type) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"PRG words must be uint32 or uint64, got {dt}")
    return dt


def expand(
    key: bytes, num_words: int, dtype: np.dtype | type = np.uint32, algorithm: str = "aes"
) -> np.ndarray:
    """``num_words`` uniform unsigned words (uint32 or uint64), a read-only zero-copy view."""
    dt = _word_dtype(dtype)
    # Native little-endian view: the stream is uniform, so byte order does not matter for
    # uniformity, but fixing "<" keeps masks identical across platforms.
    return np.frombuffer(
        expand_bytes(key, num_words * dt.itemsize, algorithm), dtype=dt.newbyteorder("<")
    )


def accumulate(
    out: np.ndarray, streams: Iterable[tuple[bytes, int]], algorithm: str = "aes"
) -> np.ndarray:
    """``out += sum(sign * expand(key, out.size))`` in place, modulo 2^(word bits).

    ``streams``: (key, sign) pairs, sign +1 or -1. Identical to adding each :func:`expand`
    stream in turn, but block by block (:data:`ACCUMULATE_BLOCK_BYTES`): each key's cipher
    continues its stream across blocks, so no d-word keystream is ever materialised. Why:
    secure aggregation adds k + 1 streams per client and |survivors| + k|dropped| at the
    server; each stream's bytes then go cipher -> L2 -> sum instead of through memory twice,
    and the memory held stays O(block), not O(d), whatever the number of streams.
    """
    dt = _word_dtype(out.dtype)
    if out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("accumulate needs a writable, contiguous 1-D word array")
    plus, minus = [], []
    for key, sign in streams:
        if sign not in (1, -1):
            raise ValueError(f"stream sign must be +1 or -1, got {sign!r}")
        enc = _keystream_cipher(key, algorithm).encryptor()
        (plus if sign == 1 else minus).append(enc)
    block_words = max(1, min(ACCUMULATE_BLOCK_BYTES // dt.itemsize, out.size))
    zeros = bytes(block_words * dt.itemsize)
    # update_into wants room for one extra cipher block beyond the input.
    buf = bytearray(block_words * dt.itemsize + 16)
    words = np.frombuffer(buf, dtype=dt.newbyteorder("<"), count=block_words)
    add, sub = np.add, np.subtract
    for lo in range(0, out.size, block_words):
        part = out[lo : lo + block_words]
        size = part.size
        data = zeros if size == block_words else memoryview(zeros)[: size * dt.itemsize]
        stream = words if size == block_words else words[:size]
        for enc in plus:
            enc.update_into(data, buf)
            add(part, stream, out=part)
        for enc in minus:
            enc.update_into(data, buf)
            sub(part, stream, out=part)
    return out
