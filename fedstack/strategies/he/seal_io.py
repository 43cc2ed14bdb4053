"""Byte-level I/O for SEAL objects through TenSEAL's low-level `sealapi` bindings.

Why this module exists: `tenseal.sealapi` exposes `save(path)` / `load(context, path)` only
(no bytes), and TenSEAL's high-level objects can neither make SEAL's seeded symmetric
ciphertexts (half the uplink bytes) nor run with a single prime. So we go through files in a
private temporary directory (tmpfs when the machine has one). Every load goes through SEAL's
own validating `load`, which checks the header, the parameter id against the context and that
every coefficient is below its modulus.

It also knows SEAL's uncompressed ciphertext layout (SEAL 4.x `Ciphertext::save_members`),
which lets the downlink carry coefficients bit-packed at the prime's width (exact, ~10% smaller
than SEAL's zstd stream of full ciphertexts) and still be loaded by SEAL's validating loader.
"""

from __future__ import annotations

import itertools
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# SEAL serialization header (seal/serialization.h): magic, header size, version, compr mode,
# reserved, total size.
SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct("<HBBBBHQ")
SEAL_HEADER_SIZE = 16
COMPR_NONE = 0
# Ciphertext members before the coefficient array: parms_id (4 x u64), is_ntt_form (u8),
# size, poly_modulus_degree, coeff_modulus_size (u64 each), scale (f64), correction_factor (u64).
CT_MEMBERS = struct.Struct("<4QBQQQdQ")
CKKS_CORRECTION_FACTOR = 1


def _tmp_root() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


class Scratch:
    """A private directory (mode 0700) for SEAL's file-only serialization; removed on close."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fedstack-he-", dir=_tmp_root())
        self._counter = itertools.count()

    def path(self) -> str:
        return os.path.join(self._dir.name, f"{next(self._counter)}.bin")

    def save(self, obj: Any) -> bytes:
        """Bytes of `obj.save(path)` (any sealapi object or Serializable)."""
        path = self.path()
        obj.save(path)
        try:
            return Path(path).read_bytes()
        finally:
            os.unlink(path)

    def load(self, obj: Any, context: Any, data: bytes | memoryview) -> Any:
        """`obj.load(context, path)` from bytes; returns obj. SEAL errors propagate."""
        path = self.path()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            if context is None:
                obj.load(path)
            else:
                obj.load(context, path)
        finally:
            os.unlink(path)
        return obj

    def close(self) -> None:
        self._dir.cleanup()


@contextmanager
def scratch() -> Iterator[Scratch]:
    s = Scratch()
    try:
        yield s
    finally:
        s.close()


def parse_header(data: bytes | memoryview) -> tuple[int, int, int, int]:
    """(version_major, version_minor, compr_mode, size) of a SEAL blob; ValueError if not one."""
    if len(data) < SEAL_HEADER_SIZE:
        raise ValueError(f"SEAL blob too short ({len(data)} bytes)")
    magic, hsize, vmaj, vmin, compr, _reserved, size = SEAL_HEADER.unpack_from(data, 0)
    if magic != SEAL_MAGIC or hsize != SEAL_HEADER_SIZE:
        raise ValueError("not a SEAL blob (bad magic)")
    if size != len(data):
        raise ValueError(f"SEAL blob says {size} bytes but has {len(data)} (truncated or padded)")
    return vmaj, vmin, compr, size


def build_ciphertext_blob(
    *,
    version: tuple[int, int],
    parms_id: list[int],
    poly_modulus_degree: int,
    coeff_modulus_size: int,
    scale: float,
    coeffs: np.ndarray,
) -> bytes:
    """An uncompressed SEAL ciphertext (NTT form, size 2) with the given coefficients.

    `coeffs` is the flat uint64 array in SEAL's order: poly, then prime, then coefficient.
    SEAL's `Ciphertext.load` validates it against the context, so a wrong value cannot slip in.
    """
    data = np.ascontiguousarray(coeffs, dtype="<u8").tobytes()
    inner_size = SEAL_HEADER_SIZE + 8 + len(data)
    total = SEAL_HEADER_SIZE + CT_MEMBERS.size + inner_size
    vmaj, vmin = version
    return b"".join(
        (
            SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER_SIZE, vmaj, vmin, COMPR_NONE, 0, total),
            CT_MEMBERS.pack(
                *parms_id,
                1,
                2,
                poly_modulus_degree,
                coeff_modulus_size,
                scale,
                CKKS_CORRECTION_FACTOR,
            ),
            SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER_SIZE, vmaj, vmin, COMPR_NONE, 0, inner_size),
            struct.pack("<Q", coeffs.size),
            data,
        )
    )


def pack_uint(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers < 2^bits into exactly ceil(len*bits/8) bytes (len % 8 == 0).

    Split into whole low bytes and the remaining high bits; eight values' high bits fill
    exactly `hi` bytes. Pure numpy, linear time.
    """
    if values.size % 8:
        raise ValueError("pack_uint needs a multiple of 8 values")
    v = np.ascontiguousarray(values, dtype="<u8")
    lo_bytes, hi = divmod(bits, 8)
    parts = [v.view(np.uint8).reshape(-1, 8)[:, :lo_bytes].reshape(-1)]
    if hi:
        h = (v >> np.uint64(8 * lo_bytes)).reshape(-1, 8)
        shifts = np.arange(8, dtype=np.uint64) * np.uint64(hi)
        word = np.bitwise_or.reduce(h << shifts, axis=1)  # 8*hi <= 56 bits
        parts.append(word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :hi].reshape(-1))
    return b"".join(p.tobytes() for p in parts)


def packed_size(count: int, bits: int) -> int:
    return count * bits // 8


def unpack_uint(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_uint`; ValueError if the length is wrong."""
    if count % 8 or len(data) != packed_size(count, bits):
        raise ValueError(f"packed data has {len(data)} bytes, expected {packed_size(count, bits)}")
    lo_bytes, hi = divmod(bits, 8)
    buf = np.frombuffer(data, dtype=np.uint8)
    lo = buf[: count * lo_bytes].reshape(count, lo_bytes)
    out = np.zeros((count, 8), dtype=np.uint8)
    out[:, :lo_bytes] = lo
    v = out.view("<u8").reshape(count).astype(np.uint64)
    if hi:
        hb = buf[count * lo_bytes :].reshape(count // 8, hi)
        wb = np.zeros((count // 8, 8), dtype=np.uint8)
        wb[:, :hi] = hb
        word = wb.view("<u8").reshape(-1, 1).astype(np.uint64)
        shifts = np.arange(8, dtype=np.uint64) * np.uint64(hi)
        mask = np.uint64((1 << hi) - 1)
        h = ((word >> shifts) & mask).reshape(count)
        v |= h << np.uint64(8 * lo_bytes)
    return v
