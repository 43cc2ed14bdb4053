"""The two C functions of SEAL's own build that the limb-wise sum needs, reached with ctypes.

Why: SEAL compresses every saved object with zstd and expands a seeded ciphertext's random
half with BLAKE2xb; neither is exposed by `tenseal.sealapi`, and Python's standard library has
neither (hashlib's BLAKE2b refuses the tree parameters BLAKE2xb's output nodes use). TenSEAL's
extension module links SEAL's copies of both with default visibility, so calling them there
gives bit-for-bit what SEAL itself computes, with no new dependency. ctypes releases the GIL
around each call.

`native()` returns None when the symbols are not there (another TenSEAL build): callers then
fall back to loading every ciphertext through SEAL (correct, much slower).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
from dataclasses import dataclass

#: The extension module `tenseal.sealapi` re-exports (it carries SEAL, zstd and BLAKE2).
SEALAPI_EXTENSION = "_sealapi_cpp"


class NativeError(ValueError):
    """A native call reported failure (bad compressed data, wrong size)."""


@dataclass(frozen=True)
class SealNative:
    """Bound C functions; every method takes raw addresses (numpy `.ctypes.data`)."""

    _zstd_decompress: ctypes._CFuncPtr  # type: ignore[name-defined]
    _zstd_is_error: ctypes._CFuncPtr  # type: ignore[name-defined]
    _zstd_error_name: ctypes._CFuncPtr  # type: ignore[name-defined]
    _blake2xb: ctypes._CFuncPtr  # type: ignore[name-defined]

    def zstd_decompress(self, dst: int, capacity: int, src: int, size: int) -> int:
        """Decompress one zstd frame; returns the output size, NativeError if invalid/too big."""
        written = self._zstd_decompress(dst, capacity, src, size)
        if self._zstd_is_error(written):
            name = self._zstd_error_name(written).decode(errors="replace")
            raise NativeError(f"zstd: {name}")
        return int(written)

    def blake2xb(self, dst: int, size: int, data: bytes, key: bytes) -> None:
        """BLAKE2xb(key, data) with `size` output bytes written to `dst` (SEAL's PRNG block)."""
        if self._blake2xb(dst, size, data, len(data), key, len(key)) != 0:
            raise NativeError("blake2xb failed")


def _bind(lib: ctypes.CDLL) -> SealNative:
    zd = lib.ZSTD_decompress
    zd.restype = ctypes.c_size_t
    zd.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    ze = lib.ZSTD_isError
    ze.restype = ctypes.c_uint
    ze.argtypes = [ctypes.c_size_t]
    zn = lib.ZSTD_getErrorName
    zn.restype = ctypes.c_char_p
    zn.argtypes = [ctypes.c_size_t]
    bx = lib.blake2xb
    bx.restype = ctypes.c_int
    bx.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    return SealNative(zd, ze, zn, bx)


@functools.cache
def native() -> SealNative | None:
    """SEAL's zstd and BLAKE2xb from TenSEAL's extension, or None if this build hides them."""
    try:
        importlib.import_module("tenseal.sealapi")
        module = importlib.import_module(SEALAPI_EXTENSION)
        lib = ctypes.CDLL(module.__file__)
        return _bind(lib)
    except (ImportError, OSError, AttributeError, TypeError):
        return None
