"""Byte-level I/O for SEAL objects through TenSEAL's low-level `sealapi` bindings.

Why this module exists: `tenseal.sealapi` exposes `save(path)` / `load(context, path)` only
(no bytes), and TenSEAL's high-level objects can neither make SEAL's seeded symmetric
ciphertexts (half the uplink bytes) nor run with a single prime. So we go through files in a
private temporary directory (tmpfs when the machine has one). Every SEAL object loaded goes
through SEAL's own validating `load`, which checks the header, the parameter id against the
context and that every coefficient is below its modulus.

It also knows SEAL's ciphertext layout (SEAL 4.x `Ciphertext::save_members`), which lets the
downlink carry coefficients bit-packed at the prime's width (exact, ~10% smaller than SEAL's
zstd stream of full ciphertexts) and still be loaded by SEAL's validating loader, and lets the
server read replies' coefficient arrays without SEAL (`CiphertextReader`, for the limb-wise
sum in `rns_add`). A serialised ciphertext is: header (16 bytes, the compression mode, the
total size), then -- compressed as a whole under zlib/zstd -- the members (`CT_MEMBERS`), a
nested uncompressed SEAL blob of the coefficient array (u64 count, then poly, prime,
coefficient order), and for a seeded ciphertext (array of `c0` only) a nested
`UniformRandomGeneratorInfo` blob (PRNG type u8, 64-byte seed). A saved plaintext (what the
client reads the secret key from) is parms_id, coeff_count, scale, then the same array.
"""

from __future__ import annotations

import itertools
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedstack.strategies.he.seal_native import NativeError, SealNative

# SEAL serialization header (seal/serialization.h): magic, header size, version, compr mode,
# reserved, total size.
SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct("<HBBBBHQ")
SEAL_HEADER_SIZE = 16
COMPR_NONE = 0
COMPR_ZLIB = 1
COMPR_ZSTD = 2
# Ciphertext members before the coefficient array: parms_id (4 x u64), is_ntt_form (u8),
# size, poly_modulus_degree, coeff_modulus_size (u64 each), scale (f64), correction_factor (u64).
CT_MEMBERS = struct.Struct("<4QBQQQdQ")
CKKS_CORRECTION_FACTOR = 1
COUNT = struct.Struct("<Q")
# Plaintext members before its coefficient array: parms_id (4 x u64), coeff_count, scale.
PLAIN_MEMBERS = struct.Struct("<4QQd")
# A seeded ciphertext's PRNG info blob: header, prng_type (u8), seed (8 x u64).
PRNG_INFO_SIZE = SEAL_HEADER_SIZE + 1 + 64


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


@dataclass(frozen=True)
class RawCiphertext:
    """A parsed SEAL ciphertext; `data` is a view into the reader's buffer (next read reuses it).

    `data` holds size*L*N words (poly, prime, coefficient), or L*N (`c0` only) when `seed` is
    set: the ciphertext is seeded and its `c1` is SEAL's PRNG stream for (prng_type, seed).
    Nothing here is validated against a context: the caller compares every field.
    """

    version: tuple[int, int]
    parms_id: tuple[int, ...]
    is_ntt_form: int
    size: int
    poly_modulus_degree: int
    coeff_modulus_size: int
    scale: float
    correction_factor: int
    data: np.ndarray
    prng_type: int | None
    seed: bytes | None


class CiphertextReader:
    """Decompresses and parses SEAL ciphertext blobs of one expected shape (N, L).

    The expected shape fixes the only two lengths a valid blob can decompress to (full, or
    seeded), so decompression is bounded by them: a compression bomb or a blob of another size
    is refused before anything is allocated for it. One buffer is reused across reads.
    """

    def __init__(
        self, poly_modulus_degree: int, coeff_modulus_size: int, lib: SealNative | None
    ) -> None:
        self.n = poly_modulus_degree
        self.limbs = coeff_modulus_size
        self.lib = lib
        words = self.limbs * self.n
        array_head = SEAL_HEADER_SIZE + COUNT.size
        self.full_len = CT_MEMBERS.size + array_head + 2 * words * 8
        self.seeded_len = CT_MEMBERS.size + array_head + words * 8 + PRNG_INFO_SIZE
        self._buf = np.empty(max(self.full_len, self.seeded_len) + 1, dtype=np.uint8)

    def supports(self, compr_mode: int) -> bool:
        return compr_mode in (COMPR_NONE, COMPR_ZLIB) or (
            compr_mode == COMPR_ZSTD and self.lib is not None
        )

    def _members(self, chunk: np.ndarray, compr: int) -> int:
        """Decompress the members into the buffer; returns their length."""
        body = chunk[SEAL_HEADER_SIZE:]
        cap = self._buf.size
        if compr == COMPR_NONE:
            if body.size >= cap:
                raise ValueError(f"{body.size} bytes of members is too large")
            self._buf[: body.size] = body
            return int(body.size)
        if compr == COMPR_ZLIB:
            inflater = zlib.decompressobj()
            try:
                out = inflater.decompress(body.tobytes(), cap)
            except zlib.error as exc:
                raise ValueError(f"zlib: {exc}") from None
            if not inflater.eof or inflater.unused_data or len(out) >= cap:
                raise ValueError("zlib stream is incomplete, too long or has trailing bytes")
            self._buf[: len(out)] = np.frombuffer(out, dtype=np.uint8)
            return len(out)
        if compr == COMPR_ZSTD:
            if self.lib is None:
                raise ValueError("zstd is not available in this TenSEAL build")
            try:
                return self.lib.zstd_decompress(
                    self._buf.ctypes.data, cap, chunk.ctypes.data + SEAL_HEADER_SIZE, body.size
                )
            except NativeError as exc:
                raise ValueError(str(exc)) from None
        raise ValueError(f"unknown SEAL compression mode {compr}")

    def read(self, chunk: np.ndarray) -> RawCiphertext:
        """Parse one blob (1-D uint8 array); ValueError naming what is wrong."""
        vmaj, vmin, compr, _ = parse_header(chunk)
        length = self._members(chunk, compr)
        if length not in (self.full_len, self.seeded_len):
            raise ValueError(
                f"members are {length} bytes, expected {self.full_len} (full) or "
                f"{self.seeded_len} (seeded) for N={self.n} with {self.limbs} prime(s)"
            )
        buf = self._buf
        *parms_id, ntt, size, n, limbs, scale, correction = CT_MEMBERS.unpack_from(buf, 0)
        pos = CT_MEMBERS.size
        array_len = length - pos - (PRNG_INFO_SIZE if length == self.seeded_len else 0)
        self._nested_header(pos, array_len, "coefficient array")
        (count,) = COUNT.unpack_from(buf, pos + SEAL_HEADER_SIZE)
        start = pos + SEAL_HEADER_SIZE + COUNT.size
        if count * 8 != array_len - SEAL_HEADER_SIZE - COUNT.size:
            raise ValueError(f"coefficient array says {count} words but holds a different size")
        data = buf[start : start + count * 8].view("<u8")
        prng_type = seed = None
        if length == self.seeded_len:
            info = start + count * 8
            self._nested_header(info, PRNG_INFO_SIZE, "PRNG info")
            prng_type = int(buf[info + SEAL_HEADER_SIZE])
            seed = buf[info + SEAL_HEADER_SIZE + 1 : info + PRNG_INFO_SIZE].tobytes()
        return RawCiphertext(
            version=(vmaj, vmin),
            parms_id=tuple(parms_id),
            is_ntt_form=ntt,
            size=size,
            poly_modulus_degree=n,
            coeff_modulus_size=limbs,
            scale=scale,
            correction_factor=correction,
            data=data,
            prng_type=prng_type,
            seed=seed,
        )

    def read_plaintext(self, blob: np.ndarray) -> np.ndarray:
        """The L*N coefficients of a saved NTT-form plaintext at this shape (a buffer view).

        Layout (SEAL 4.x `Plaintext::save_members`): parms_id (4 x u64), coeff_count (u64),
        scale (f64), then the nested coefficient array as in a ciphertext.
        """
        _, _, compr, _ = parse_header(blob)
        length = self._members(blob, compr)
        words = self.limbs * self.n
        head = PLAIN_MEMBERS.size
        if length != head + SEAL_HEADER_SIZE + COUNT.size + words * 8:
            raise ValueError(f"plaintext members are {length} bytes, expected {words} words")
        (coeff_count,) = COUNT.unpack_from(self._buf, 32)
        self._nested_header(head, length - head, "plaintext array")
        (count,) = COUNT.unpack_from(self._buf, head + SEAL_HEADER_SIZE)
        if coeff_count != words or count != words:
            raise ValueError(f"plaintext has {count} words, expected {words}")
        start = head + SEAL_HEADER_SIZE + COUNT.size
        return self._buf[start : start + words * 8].view("<u8")

    def _nested_header(self, pos: int, length: int, what: str) -> None:
        magic, hsize, _vmaj, _vmin, compr, _res, size = SEAL_HEADER.unpack_from(self._buf, pos)
        if magic != SEAL_MAGIC or hsize != SEAL_HEADER_SIZE or compr != COMPR_NONE:
            raise ValueError(f"{what}: not an uncompressed SEAL blob (bad magic)")
        if size != length:
            raise ValueError(f"{what} says {size} bytes, has {length}")


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
    return pack_rows(np.asarray(values).reshape(1, -1), bits).tobytes()


def write_low_bytes(out: np.ndarray, values: np.ndarray, width: int) -> None:
    """out[r] := the low `width` bytes of every value of row r, little-endian, back to back.

    `out` is (rows, n * width) uint8 with contiguous rows. Written through a packed record
    view (fields of 8, 4, 2, 1 bytes): a few casting passes instead of a copy with a `width`-byte
    inner loop (~4x faster).
    """
    rows, n = values.shape
    fields, offset = [], 0
    for size in (8, 4, 2, 1):
        if width - offset >= size:
            fields.append((f"f{offset}", f"<u{size}", offset))
            offset += size
    assert offset == width, width
    record = np.dtype(
        {
            "names": [f[0] for f in fields],
            "formats": [f[1] for f in fields],
            "offsets": [f[2] for f in fields],
            "itemsize": width,
        }
    )
    view = out.view(record).reshape(rows, n)
    for name, _, off in fields:
        view[name] = values >> np.uint64(8 * off) if off else values


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """`pack_uint` of every row at once: (rows, n) -> (rows, n * bits / 8) uint8.

    Row r of the result equals `pack_uint(values[r], bits)` byte for byte (n % 8 == 0).
    """
    rows, n = values.shape
    if n % 8:
        raise ValueError("pack_rows needs rows of a multiple of 8 values")
    v = np.ascontiguousarray(values, dtype="<u8")
    lo_bytes, hi = divmod(bits, 8)
    out = np.empty((rows, packed_size(n, bits)), dtype=np.uint8)
    write_low_bytes(out[:, : n * lo_bytes], v, lo_bytes)
    if hi:
        # The high bits of eight values, one byte each, read as one u64 per group of eight;
        # then squeeze out the unused bits of every byte, halving the lanes three times.
        word = (v >> np.uint64(8 * lo_bytes)).astype(np.uint8).view("<u8")
        for lane, width in ((8, hi), (16, 2 * hi), (32, 4 * hi)):
            low = np.uint64(_lane_mask(2 * lane, (1 << width) - 1))
            word = (word & low) | ((word >> np.uint64(lane - width)) & (low << np.uint64(width)))
        write_low_bytes(out[:, n * lo_bytes :], word, hi)
    return out


def _lane_mask(lane: int, value: int) -> int:
    """`value` repeated in every `lane`-bit lane of a u64."""
    return sum(value << shift for shift in range(0, 64, lane))


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
