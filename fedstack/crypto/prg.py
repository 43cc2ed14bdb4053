"""Pseudo-random generator: a 256-bit key expanded into uniform machine words.

Why a stream cipher: AES-256-CTR (AES-NI) or ChaCha20 keystream *is* a cryptographic PRG, and
``cryptography`` produces it at GB/s straight into a buffer that NumPy views without a copy.
Each key expands exactly one stream (keys are derived per purpose and round), so a constant
nonce is safe: the (key, nonce) pair never repeats.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PrgName = Literal["aes", "chacha20"]
PRG_ALGORITHMS: tuple[str, ...] = ("aes", "chacha20")
PRG_KEY_BYTES = 32
PRG_NONCE = bytes(16)
"""Constant nonce/initial counter: sound because each derived key expands a single stream."""


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


def expand(
    key: bytes, num_words: int, dtype: np.dtype | type = np.uint32, algorithm: str = "aes"
) -> np.ndarray:
    """``num_words`` uniform unsigned words (uint32 or uint64), a read-only zero-copy view."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise ValueError(f"PRG words must be uint32 or uint64, got {dt}")
    # Native little-endian view: the stream is uniform, so byte order does not matter for
    # uniformity, but fixing "<" keeps masks identical across platforms.
    return np.frombuffer(
        expand_bytes(key, num_words * dt.itemsize, algorithm), dtype=dt.newbyteorder("<")
    )
