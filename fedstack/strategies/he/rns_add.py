"""The server's encrypted sum as arrays: ciphertext coefficients added limb by limb, mod q_j.

Why: adding two CKKS ciphertexts is adding their coefficient arrays modulo each RNS prime q_j
(SEAL's `Evaluator.add` does nothing else). Going through SEAL object by object costs a file
round trip, a validating load and a Python call per ciphertext; here a reply is parsed
straight from its bytes, a seeded ciphertext's random half is recomputed from its seed, and
whole blocks of ciphertexts are added with NumPy into one running uint64 array of shape
(ciphertexts, 2 polys, L primes, N coefficients). Two input forms:
- "prg" (`prg_form`, the default uplink): c0 unpacked with one strided NumPy pass per prime,
  c1 one AES-CTR call per block; no per-ciphertext Python work at all;
- SEAL blobs, seeded or full (`seal_io.CiphertextReader`, `seal_prng` for SEAL's BLAKE2xb
  seeds): per-ciphertext parsing, the expansion dominates (why "prg" exists).

Validation: "prg" chunks of exactly the context's size, every coefficient below its prime;
SEAL blobs as SEAL's loader and more (header, version, compression, declared sizes, parameter
id, NTT form, size 2, N, number of primes, the exact expected scale, correction factor 1, a
known PRNG type, every coefficient below its prime). A reply is added whole or not at all: if
ciphertext i is bad (or the caller's `verify` fails), the blocks already added are subtracted
again (the arithmetic is exact, so this restores the sum bit for bit) and CiphertextError is
raised.

Memory: the running sum, plus one block of parsed ciphertexts (~4 MiB) per worker thread,
whatever the number of replies. Additions are lazy: coefficients below q_j < 2^60 are summed
without reduction while the total cannot reach 2^64, then reduced once (`np.remainder`).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fedstack.strategies.he import prg_form
from fedstack.strategies.he.errors import CiphertextError
from fedstack.strategies.he.prg_form import PrgExpander
from fedstack.strategies.he.seal_io import (
    CKKS_CORRECTION_FACTOR,
    CiphertextReader,
    RawCiphertext,
    pack_rows,
)
from fedstack.strategies.he.seal_native import SealNative
from fedstack.strategies.he.seal_prng import SeedExpander, max_multiple

#: Bytes of parsed ciphertexts processed per NumPy pass (bounds the temporary memory).
BLOCK_BYTES = 4 * 1024 * 1024
#: Ciphertexts bit-packed per pass when building the downlink (bounds its temporaries).
PACK_ROWS = 64
#: More threads than this gain little: each reply is memory-bandwidth bound past two cores.
MAX_THREADS = 4
POLYS = 2
U64_LIMIT = 2**64


@dataclass(frozen=True)
class LimbLayout:
    """What every summed ciphertext must be: one SEAL parameter level and scale."""

    version: tuple[int, int]
    parms_id: tuple[int, ...]
    poly_modulus_degree: int
    primes: tuple[int, ...]
    scale: float


def default_threads() -> int:
    """Worker threads for one sum: the CPUs this process may use, at most MAX_THREADS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


class _Worker:
    """One thread's buffers: a block of ciphertexts, SEAL decompression, AES expansion."""

    def __init__(self, n: int, primes: tuple[int, ...], block: int, lib: SealNative | None) -> None:
        self.reader = CiphertextReader(n, len(primes), lib)
        self.buf = np.empty((block, POLYS, len(primes), n), dtype=np.uint64)
        self._prg_args = (n, primes, block)
        self._prg: PrgExpander | None = None

    @property
    def prg(self) -> PrgExpander:
        if self._prg is None:
            self._prg = PrgExpander(*self._prg_args)
        return self._prg


class LimbSum:
    """A running sum of `count` ciphertexts, one uint64 array; add reply by reply.

    Blocks of a reply are parsed and added by `threads` workers (ctypes and NumPy release the
    GIL; blocks cover disjoint ciphertexts, so they never write the same memory).
    """

    def __init__(
        self, layout: LimbLayout, count: int, lib: SealNative | None, threads: int | None = None
    ) -> None:
        self.layout = layout
        self.count = count
        n, limbs = layout.poly_modulus_degree, len(layout.primes)
        self.expander = SeedExpander(lib)
        self.block = max(1, BLOCK_BYTES // (POLYS * limbs * n * 8))
        blocks = -(-count // self.block)
        self.threads = max(1, min(threads or default_threads(), blocks))
        self._workers = [_Worker(n, layout.primes, self.block, lib) for _ in range(self.threads)]
        self._q = np.array(layout.primes, dtype=np.uint64).reshape(1, 1, limbs, 1)
        self._q1 = self._q[0]
        self._limits = np.array([max_multiple(q) for q in layout.primes], dtype=np.uint64).reshape(
            1, limbs, 1
        )
        # How many reduced terms fit in a uint64 before a reduction is needed.
        self._headroom = (U64_LIMIT - 1) // max(layout.primes)
        self._acc: np.ndarray | None = None
        self._pending = 0  # terms summed since the last reduction
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        """Worker threads plus one for a caller's concurrent check (kept across replies)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads + 1,
                                            thread_name_prefix="fedstack-he-sum")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def supports(self, compr_mode: int) -> bool:
        return self._workers[0].reader.supports(compr_mode)

    def add(
        self, blob: np.ndarray, lengths: np.ndarray, verify: Callable[[], None] | None = None
    ) -> None:
        """Validate and add one reply (its ciphertexts back to back in `blob`).

        `verify`, if given, runs once the blocks are added (it may wait on a check of the
        whole message running meanwhile); CiphertextError from it undoes the add too.
        """
        if lengths.size != self.count:
            raise CiphertextError(f"{lengths.size} ciphertexts, expected {self.count}")
        blob = np.ascontiguousarray(blob, dtype=np.uint8)
        ends = np.cumsum(lengths)
        starts = ends - lengths

        def read(worker: _Worker, lo: int, hi: int) -> np.ndarray:
            return self._read(worker, blob, starts, ends, lo, hi)

        self._add_all(read, verify)

    def add_prg(
        self, blob: np.ndarray, lengths: np.ndarray, verify: Callable[[], None] | None = None
    ) -> None:
        """Validate and add one reply in the "prg" form (`prg_form`); `verify` as in `add`."""
        lay = self.layout
        size = prg_form.chunk_len(lay.poly_modulus_degree, lay.primes)
        if lengths.size != self.count:
            raise CiphertextError(f"{lengths.size} ciphertexts, expected {self.count}")
        if np.any(lengths != size) or blob.size != size * self.count:
            raise CiphertextError(
                f"prg ciphertexts must be {size} bytes each under this context's parameters "
                "(another preset, or truncated)"
            )
        blob = np.ascontiguousarray(blob, dtype=np.uint8)

        def read(worker: _Worker, lo: int, hi: int) -> np.ndarray:
            return self._read_prg(worker, blob, size, lo, hi)

        self._add_all(read, verify)

    def _add_all(
        self, read: Callable[[_Worker, int, int], np.ndarray], verify: Callable[[], None] | None
    ) -> None:
        """Add every block `read` gives, or none: undo and raise the first error."""
        if self._acc is None:
            limbs, n = len(self.layout.primes), self.layout.poly_modulus_degree
            self._acc = np.zeros((self.count, POLYS, limbs, n), dtype=np.uint64)
        if self._pending + 1 > self._headroom:
            self._reduce()
        blocks = [(lo, min(lo + self.block, self.count)) for lo in range(0, self.count, self.block)]
        # A caller's check (the reply's SHA-256) runs meanwhile on a thread of its own: leave
        # it a CPU (measured: one worker + the hash beats two workers + the hash on 2 cores).
        workers = self.threads if verify is None else max(1, self.threads - 1)
        done, errors = self._run(read, blocks, np.add, workers)
        if verify is not None:
            try:
                verify()
            except CiphertextError as exc:  # explains any block error too: it comes first
                errors = {-1: exc}
        if errors:
            # Undo what was added: these blocks parsed before, so they parse again.
            _, again = self._run(read, done, np.subtract, self.threads)
            assert not again
            raise errors[min(errors)]
        self._pending += 1

    def _run(
        self,
        read: Callable[[_Worker, int, int], np.ndarray],
        blocks: list[tuple[int, int]],
        op: np.ufunc,
        workers: int,
    ) -> tuple[list[tuple[int, int]], dict[int, CiphertextError]]:
        """Apply `op`(sum, block) for every block with `workers` threads (at most
        `self.threads`); (blocks done, errors by first index)."""
        assert self._acc is not None
        acc = self._acc

        def work(t: int) -> tuple[list[tuple[int, int]], dict[int, CiphertextError]]:
            done: list[tuple[int, int]] = []
            for lo, hi in blocks[t::workers]:
                try:
                    block = read(self._workers[t], lo, hi)
                except CiphertextError as exc:
                    return done, {lo: exc}  # this worker stops; the others finish theirs
                op(acc[lo:hi], block, out=acc[lo:hi])
                done.append((lo, hi))
            return done, {}

        results = [work(0)] if workers == 1 else list(self.pool.map(work, range(workers)))
        done = [b for d, _ in results for b in d]
        errors = {lo: exc for _, e in results for lo, exc in e.items()}
        return done, errors

    def _reduce(self) -> None:
        assert self._acc is not None
        np.remainder(self._acc, self._q, out=self._acc)
        self._pending = 1

    def _read(
        self,
        worker: _Worker,
        blob: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        lo: int,
        hi: int,
    ) -> np.ndarray:
        """Ciphertexts lo..hi-1 as reduced coefficients (a view of the worker's buffer)."""
        block = worker.buf[: hi - lo]
        seeds: dict[int, tuple[int, bytes]] = {}
        for k, i in enumerate(range(lo, hi)):
            try:
                raw = worker.reader.read(blob[int(starts[i]) : int(ends[i])])
            except ValueError as exc:
                raise CiphertextError(f"ciphertext {i}: {exc}") from None
            self._check(raw, i)
            if raw.seed is None:
                block[k] = raw.data.reshape(block.shape[1:])
                continue
            assert raw.prng_type is not None
            if not self.expander.supports(raw.prng_type):
                raise CiphertextError(f"ciphertext {i}: unknown PRNG type {raw.prng_type}")
            block[k, 0] = raw.data.reshape(block.shape[2:])
            self.expander.stream(raw.prng_type, raw.seed, block[k, 1].reshape(-1))
            seeds[k] = (raw.prng_type, raw.seed)
        self._check_reduced(block[:, 0], lo)
        c1 = block[:, 1]
        if len(seeds) < hi - lo:  # full ciphertexts: c1 must already be reduced
            full = [k for k in range(hi - lo) if k not in seeds]
            bad_c1 = [k for k in full if bool((c1[k] >= self._q1).any())]
            if bad_c1:
                raise CiphertextError(f"ciphertext {lo + bad_c1[0]}: a coefficient >= its modulus")
        if seeds:
            for k in np.flatnonzero((c1 >= self._limits).any(axis=(1, 2))):
                prng_type, seed = seeds[int(k)]  # full rows are < q, never rejected
                self.expander.redraw(prng_type, seed, c1[k], self.layout.primes)
            np.remainder(c1, self._q1, out=c1)
        return block

    def _read_prg(
        self, worker: _Worker, blob: np.ndarray, size: int, lo: int, hi: int
    ) -> np.ndarray:
        """Ciphertexts lo..hi-1 of a "prg" reply as reduced coefficients."""
        block = worker.buf[: hi - lo]
        n, primes = self.layout.poly_modulus_degree, self.layout.primes
        prg_form.unpack_c0(blob, lo * size, hi - lo, size, n, primes, block[:, 0])
        self._check_reduced(block[:, 0], lo)
        keys = blob[lo * size : hi * size].reshape(hi - lo, size)[:, : prg_form.KEY_BYTES]
        if bool((keys == keys[0]).all()):  # one key per reply: one AES call per block
            worker.prg.c1(keys[0].tobytes(), lo, block[:, 1])
        else:
            for k in range(hi - lo):
                worker.prg.c1(keys[k].tobytes(), lo + k, block[k : k + 1, 1])
        return block

    def _check_reduced(self, polys: np.ndarray, lo: int) -> None:
        """CiphertextError naming the first ciphertext of (count, L, N) with a value >= q_j.

        A max per prime is one fast pass; the per-ciphertext search runs only on failure.
        """
        for j, q in enumerate(self.layout.primes):
            if int(polys[:, j].max()) >= q:
                bad = np.flatnonzero((polys[:, j] >= np.uint64(q)).any(axis=1))
                raise CiphertextError(
                    f"ciphertext {lo + int(bad[0])}: a coefficient >= its modulus"
                )

    def _check(self, raw: RawCiphertext, i: int) -> None:
        lay = self.layout
        if raw.version != lay.version:
            raise CiphertextError(f"ciphertext {i}: SEAL version {raw.version[0]}.{raw.version[1]}")
        if raw.parms_id != lay.parms_id:
            raise CiphertextError(
                f"ciphertext {i} is not under this context's parameters (parameter level / "
                "parms_id differs: another preset or key setup)"
            )
        if (
            raw.size != POLYS
            or raw.is_ntt_form != 1
            or raw.poly_modulus_degree != lay.poly_modulus_degree
            or raw.coeff_modulus_size != len(lay.primes)
            or raw.correction_factor != CKKS_CORRECTION_FACTOR
        ):
            raise CiphertextError(f"ciphertext {i} has the wrong shape or parameter level")
        if raw.scale != lay.scale:
            raise CiphertextError(f"ciphertext {i} has scale {raw.scale!r}, expected {lay.scale!r}")

    def packed(self, bits: list[int], header: bytes) -> tuple[np.ndarray, str]:
        """The sum in the downlink form: per ciphertext `header`, then every (poly, prime)'s
        coefficients bit-packed at the prime's width; (count, bytes per ciphertext) uint8,
        and the SHA-256 of those bytes (hashed block by block while later blocks pack)."""
        acc = self._acc
        if acc is None:
            raise CiphertextError("no valid encrypted reply to aggregate")
        n = self.layout.poly_modulus_degree
        widths = [n * b // 8 for b in bits]
        row_len = len(header) + POLYS * sum(widths)
        out = np.empty((self.count, row_len), dtype=np.uint8)
        out[:, : len(header)] = np.frombuffer(header, dtype=np.uint8)
        reduce = self._pending > 1

        def pack(lo: int) -> None:  # rows lo.. : reduce (in cache) and pack, one worker each
            hi = min(lo + PACK_ROWS, self.count)
            if reduce:
                np.remainder(acc[lo:hi], self._q, out=acc[lo:hi])
            pos = len(header)
            for poly in range(POLYS):
                for j, b in enumerate(bits):
                    out[lo:hi, pos : pos + widths[j]] = pack_rows(acc[lo:hi, poly, j], b)
                    pos += widths[j]

        starts = range(0, self.count, PACK_ROWS)
        digest = hashlib.sha256()
        packed_rows = map(pack, starts) if self.threads == 1 else self.pool.map(pack, starts)
        for lo, _ in zip(starts, packed_rows, strict=True):  # in order, as blocks finish
            digest.update(out[lo : min(lo + PACK_ROWS, self.count)])
        self._pending = 1
        return out, digest.hexdigest()
