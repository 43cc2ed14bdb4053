"""CKKS encrypted averaging: client encryption, validated streaming sum, key-holder decryption.

Flow: a client flattens its model, multiplies by its weight n_k (an integer, its number of
examples), appends n_k, splits the vector into chunks of `slots - 1` values, puts the check
constant 1 into the last slot of every chunk and encrypts each chunk with SEAL's symmetric
encryption under the shared secret key. Symmetric encryption is allowed
because every client is a key holder, and it is what makes *seeded* ciphertexts possible: the
uniformly random half of a fresh ciphertext is replaced by the seed it was expanded from,
halving the uplink (the "prg" form, `prg_form`: a public AES key; SEAL's own seeded form is
still accepted). The server only ever holds a `PublicContext`: it validates each reply
(fingerprint, count, scale, parameters, every coefficient below its prime), adds it reply by
reply into one running sum of coefficient arrays (`rns_add`; SEAL's Evaluator is the reference
backend) and sends the sum back bit-packed at the prime's width.
Key holders decrypt, verify the aggregate (below), read the total weight and divide.

Verification (`decrypt_mean`): CKKS decryption never fails. A ciphertext that is random bytes,
or was made under another key (whatever fingerprint it is labelled with), decrypts to values
spread over the whole modulus, about q / scale * sqrt(N / 24) ~ 4e8 with the standard preset.
So every ciphertext carries one check slot holding 1 per contribution: a sum of m replies must
decrypt to m in the check slot of *every* ciphertext, within the 8-sigma noise bound (~1e-5).
A forged or corrupted ciphertext anywhere in any reply lands a check slot within that window
with probability ~1e-14 (one check slot per ciphertext also catches a reply with one bad
ciphertext among good ones). On top, the bounds every honest reply obeys must hold for the
sum: m <= total weight <= m * max_weight (an integer) and |sum n_k w_k| <= max_abs_value *
total. These checks are closed under disjoint union (if every part of a partition passes, the
whole passes), which is what lets the server find a bad reply by testing sums of groups.
What they cannot detect is a well-formed encryption of wrong values within the bounds (a key
holder, or anyone with the public key, can make one): that is poisoning, not corruption.

Nothing here imports Flower: the wire form is a dict of numpy arrays (`EncryptedVector.
to_arrays`), which the strategy and the client mod put into an ArrayRecord.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from fedstack.strategies.he import prg_form, rns_add
from fedstack.strategies.he.errors import CiphertextError
from fedstack.strategies.he.keys import HEKeyError, PublicContext, SecretContext, _sealapi
from fedstack.strategies.he.presets import noise_bound
from fedstack.strategies.he.rns_add import LimbLayout, LimbSum
from fedstack.strategies.he.seal_io import (
    CT_MEMBERS,
    SEAL_HEADER_SIZE,
    CiphertextReader,
    Scratch,
    build_ciphertext_blob,
    pack_uint,
    parse_header,
    unpack_uint,
)
from fedstack.strategies.he.seal_native import native
from fedstack.strategies.he.seal_prng import SeedExpander

WIRE_FORMAT = "fedstack-ckks-vector"
#: 2: every ciphertext's last slot is a check slot (version 1 had none).
WIRE_VERSION = 2
# Keys of the wire form inside an ArrayRecord.
META_KEY = "he.meta"
LENGTHS_KEY = "he.lengths"
BLOB_KEY = "he.blob"
WIRE_KEYS = (META_KEY, LENGTHS_KEY, BLOB_KEY)
# Uplink kinds: "prg" (c0 byte-packed + a public AES key for c1, see `prg_form`; the
# default), SEAL blobs ("seeded": SEAL's seeded form, half size; "full"); the
# downlink aggregate is "packed": per ciphertext its scale (f64) + coefficients bit-packed.
Kind = Literal["prg", "seeded", "full", "packed"]
UPLINK_KINDS = ("prg", "seeded", "full")
#: How the server adds: "limbs" adds coefficient arrays with NumPy (`rns_add`), "seal" loads
#: every ciphertext through SEAL and uses its Evaluator (the reference; the fallback when
#: TenSEAL's build lacks SEAL's zstd/BLAKE2xb symbols), "auto" picks "limbs" when it can.
SumBackend = Literal["auto", "limbs", "seal"]
PACKED_SCALE = struct.Struct("<d")
# Slack over the uncompressed size of a SEAL ciphertext blob: seed info and zstd framing.
SEAL_BLOB_SLACK = 512
MAX_META_BYTES = 4096
DIGEST_MISMATCH = "ciphertext digest mismatch (corrupted or tampered in transit)"
#: What each contribution puts into the check slot of each of its ciphertexts.
CHECK_VALUE = 1.0
#: The decrypted total weight must be this close to an integer (weights are example counts;
#: the capacity check keeps the real error orders of magnitude below).
WEIGHT_ROUNDING_TOLERANCE = 0.25


class AggregateCheckError(CiphertextError):
    """A decrypted sum fails its check slots or bounds: some summed ciphertext was bad.

    The message carries decrypted numbers: it is for the key holder's own log, never for a
    reply to the server.
    """


@dataclass(frozen=True)
class EncryptedVector:
    """An encrypted weighted vector: `dim` values then one weight slot, in ciphertext chunks.

    Each ciphertext holds `slots - 1` of those values and a check slot (see `layout`).

    `num_terms` is how many client vectors were summed into it (1 for a client's reply); the
    noise bound grows with it. `digest` (SHA-256 of blob) catches truncation and corruption in
    transit; it is no authentication (CKKS ciphertexts are malleable: transport security and
    node authentication are Flower's job). `unverified_digest` is set only by
    `from_arrays(..., verify_digest=False)`: the digest the sender claimed, which
    `EncryptedSum.add` then checks while it sums (SHA-256 runs at ~1.2 GB/s, a third of the
    server's time if done first).
    """

    kind: Kind
    fingerprint: str
    dim: int
    scale_bits: int
    num_terms: int
    lengths: np.ndarray  # int64, bytes per ciphertext
    blob: np.ndarray  # uint8, all ciphertexts back to back
    unverified_digest: str | None = field(default=None, compare=False, repr=False)

    @property
    def count(self) -> int:
        return int(self.lengths.size)

    @property
    def nbytes(self) -> int:
        return int(self.blob.nbytes + self.lengths.nbytes)

    def digest(self) -> str:
        """SHA-256 of the blob, computed once (replies and aggregates can be hundreds of MB)."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            # Over the array's own buffer: no copy.
            cached = hashlib.sha256(memoryview(np.ascontiguousarray(self.blob))).hexdigest()
            self._with_digest(cached)
        return cached

    def _with_digest(self, digest: str) -> EncryptedVector:
        """Record the blob's digest, computed by whoever wrote the blob; returns self.

        Not a field: `dataclasses.replace` (a new blob) must not carry it over.
        """
        object.__setattr__(self, "_digest", digest)
        return self

    def chunks(self) -> list[memoryview]:
        mv = memoryview(np.ascontiguousarray(self.blob, dtype=np.uint8))
        ends = np.cumsum(self.lengths)
        starts = ends - self.lengths
        return [mv[int(a) : int(b)] for a, b in zip(starts, ends, strict=True)]

    def meta(self) -> dict[str, Any]:
        return {
            "format": WIRE_FORMAT,
            "version": WIRE_VERSION,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "scale_bits": self.scale_bits,
            "num_terms": self.num_terms,
            "count": self.count,
            "digest": self.digest(),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        meta = np.frombuffer(json.dumps(self.meta()).encode(), dtype=np.uint8).copy()
        return {META_KEY: meta, LENGTHS_KEY: self.lengths, BLOB_KEY: self.blob}

    def verified(self) -> EncryptedVector:
        """This vector with its claimed digest checked (CiphertextError if it differs)."""
        if self.unverified_digest is None:
            return self
        if self.digest() != self.unverified_digest:
            raise CiphertextError(DIGEST_MISMATCH)
        return replace(self, unverified_digest=None)

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], *, verify_digest: bool = True
    ) -> EncryptedVector:
        """Parse the wire form; CiphertextError on any structural problem (not yet crypto).

        With `verify_digest=False` the digest is left for `EncryptedSum.add` (which checks it
        concurrently with the sum) or `verified()`: pass such a vector to nothing else.
        """
        if set(arrays) != set(WIRE_KEYS):
            raise CiphertextError(
                f"expected arrays {sorted(WIRE_KEYS)}, got {sorted(arrays)[:6]}"
            )
        meta_a, lengths, blob = (np.asarray(arrays[k]) for k in WIRE_KEYS)
        if meta_a.dtype != np.uint8 or meta_a.ndim != 1 or meta_a.size > MAX_META_BYTES:
            raise CiphertextError("he.meta must be a 1-D uint8 array of JSON")
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise CiphertextError(f"he.blob must be 1-D uint8, got {blob.dtype} {blob.shape}")
        if lengths.dtype != np.int64 or lengths.ndim != 1:
            raise CiphertextError(f"he.lengths must be 1-D int64, got {lengths.dtype}")
        try:
            meta = json.loads(meta_a.tobytes())
        except ValueError:
            raise CiphertextError("he.meta is not JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != WIRE_FORMAT:
            raise CiphertextError("he.meta is not a fedstack CKKS vector header")
        if meta.get("version") != WIRE_VERSION:
            raise CiphertextError(f"unsupported CKKS wire version {meta.get('version')!r}")
        kind = meta.get("kind")
        if kind not in (*UPLINK_KINDS, "packed"):
            raise CiphertextError(f"unknown ciphertext kind {kind!r}")
        for key in ("dim", "scale_bits", "num_terms", "count"):
            if not isinstance(meta.get(key), int) or meta[key] < 0:
                raise CiphertextError(f"he.meta[{key!r}] must be a non-negative integer")
        if meta["count"] != lengths.size:
            raise CiphertextError(
                f"header says {meta['count']} ciphertexts, lengths has {lengths.size}"
            )
        if lengths.size and (lengths.min() <= 0 or int(lengths.sum()) != blob.size):
            raise CiphertextError(
                f"ciphertext lengths sum to {int(lengths.sum())}, blob has {blob.size} bytes "
                "(truncated?)"
            )
        claimed = meta.get("digest")
        if not isinstance(claimed, str):
            raise CiphertextError("he.meta['digest'] must be a string")
        ev = cls(
            kind=kind,
            fingerprint=str(meta.get("fingerprint")),
            dim=meta["dim"],
            scale_bits=meta["scale_bits"],
            num_terms=meta["num_terms"],
            lengths=lengths,
            blob=blob,
            unverified_digest=claimed,
        )
        return ev.verified() if verify_digest else ev


def num_ciphertexts(dim: int, slots: int) -> int:
    """Ciphertexts for `dim` values plus the weight slot (each also holds a check slot)."""
    return math.ceil((dim + 1) / (slots - 1))


def _to_slots(vector: np.ndarray, slots: int, count: int) -> np.ndarray:
    """(count, slots) matrix: the vector in row-major chunks of slots - 1, check slot last."""
    data = slots - 1
    out = np.zeros((count, slots), dtype=np.float64)
    padded = np.zeros(count * data, dtype=np.float64)
    padded[: vector.size] = vector
    out[:, :data] = padded.reshape(count, data)
    out[:, data] = CHECK_VALUE
    return out


def _check_scale_bits(scale_bits: int) -> float:
    if not 14 <= scale_bits <= 58:
        raise ValueError(f"scale_bits={scale_bits} outside 14..58")
    return float(2**scale_bits)


def encrypt_update(
    ctx: SecretContext,
    values: np.ndarray,
    weight: int,
    *,
    scale_bits: int,
    max_abs_value: float,
    max_weight: int,
    seeded: bool = True,
    kind: Kind | None = None,
) -> EncryptedVector:
    """Encrypt (weight * values, weight) under the client's secret key.

    Refuses values outside +-max_abs_value and weights above max_weight: those bounds are what
    the configuration's overflow check assumed, and a silent wrap-around would corrupt the sum.
    The form: `kind`, else "prg" when `seeded` (c1 from a public AES key, see `prg_form`;
    the default) or "full". "seeded" (SEAL's own seeded ciphertexts) stays available: the
    server accepts all three. Making "prg" reads SEAL's zstd output, so a TenSEAL build that
    hides SEAL's zstd (`seal_native.native()` is None) sends "seeded" instead.
    """
    if kind is None:
        kind = ("prg" if native() is not None else "seeded") if seeded else "full"
    if kind not in UPLINK_KINDS:
        raise ValueError(f"cannot encrypt to kind {kind!r}; choose one of {UPLINK_KINDS}")
    if not isinstance(ctx, SecretContext) or ctx.secret_key is None:
        raise HEKeyError("encryption needs the secret context (clients hold the secret key)")
    scale = _check_scale_bits(scale_bits)
    vec = np.asarray(values, dtype=np.float64)
    if vec.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {vec.shape}")
    if not np.all(np.isfinite(vec)):
        raise ValueError("update contains NaN or infinity; refusing to encrypt it")
    peak = float(np.max(np.abs(vec))) if vec.size else 0.0
    if peak > max_abs_value:
        raise ValueError(
            f"update has |value| {peak:.4g} > aggregation.max_abs_value={max_abs_value:g}; "
            "the sum could overflow the CKKS modulus (raise max_abs_value)"
        )
    if isinstance(weight, bool) or int(weight) != weight or not 1 <= weight <= max_weight:
        raise ValueError(
            f"weight {weight!r} must be an integer in 1..aggregation.max_weight={max_weight}"
        )
    weight = int(weight)
    s = _sealapi()
    slots = ctx.slots
    count = num_ciphertexts(vec.size, slots)
    weighted = np.empty(vec.size + 1, dtype=np.float64)
    np.multiply(vec, float(weight), out=weighted[: vec.size])
    weighted[vec.size] = float(weight)
    rows = _to_slots(weighted, slots, count)
    del weighted
    if kind == "prg":
        blob = _encrypt_prg(ctx, rows, scale)
        return EncryptedVector(
            kind="prg",
            fingerprint=ctx.fingerprint,
            dim=int(vec.size),
            scale_bits=scale_bits,
            num_terms=1,
            lengths=np.full(count, blob.size // count, dtype=np.int64),
            blob=blob,
        )
    encoder = s.CKKSEncoder(ctx.seal)
    encryptor = s.Encryptor(ctx.seal, ctx.secret_key)
    scratch = Scratch()
    parts: list[bytes] = []
    try:
        for i in range(count):
            plain = s.Plaintext()
            encoder.encode(rows[i].tolist(), scale, plain)
            if kind == "seeded":
                parts.append(scratch.save(encryptor.encrypt_symmetric(plain)))
            else:
                ct = s.Ciphertext()
                encryptor.encrypt_symmetric(plain, ct)
                parts.append(scratch.save(ct))
    finally:
        scratch.close()
    return EncryptedVector(
        kind=kind,
        fingerprint=ctx.fingerprint,
        dim=int(vec.size),
        scale_bits=scale_bits,
        num_terms=1,
        lengths=np.array([len(p) for p in parts], dtype=np.int64),
        blob=np.frombuffer(b"".join(parts), dtype=np.uint8).copy(),
    )


def _secret_ntt(ctx: SecretContext) -> np.ndarray:
    """The secret key s in NTT form under the data primes, (L, N) uint64.

    SEAL stores it as a plaintext at the key level (the data primes, then the special prime
    when there is one); the data level's limbs are its first L.
    """
    primes = ctx.data_primes
    n = ctx.preset.poly_modulus_degree
    key_limbs = len(ctx.preset.coeff_modulus_bits)
    reader = CiphertextReader(n, key_limbs, native())
    words = reader.read_plaintext(np.frombuffer(ctx.secret_key_bytes, dtype=np.uint8))
    return words.reshape(key_limbs, n)[: len(primes)].copy()


def _encrypt_prg(ctx: SecretContext, rows: np.ndarray, scale: float) -> np.ndarray:
    """The "prg" form of the rows' encryptions: chunks `key || c0` (see `prg_form`).

    SEAL encrypts each row symmetrically in its seeded form, (c0', a') with
    c0' = -a' s + m + e (SEAL's noise) and a' = BLAKE2xb(seed) (`seal_prng`). The ciphertext
    sent is (c0, a) for the AES-expanded a, with c0 = c0' + (a' - a) s = -a s + m + e: the
    same message and noise. The product is NumPy's (`prg_form.ShoupMultiplier`), so each row
    costs SEAL one encode, one encryption and one save, as SEAL's own seeded form does.
    """
    s = _sealapi()
    primes = tuple(ctx.data_primes)
    n = ctx.preset.poly_modulus_degree
    limbs = len(primes)
    count = rows.shape[0]
    q = np.array(primes, dtype=np.uint64).reshape(1, limbs, 1)
    key = os.urandom(prg_form.KEY_BYTES)
    block = max(1, min(count, rns_add.BLOCK_BYTES // (2 * limbs * n * 8)))
    lib = native()
    expander = prg_form.PrgExpander(n, primes, block)
    seeds = SeedExpander(lib)
    reader = CiphertextReader(n, limbs, lib)
    secret = prg_form.ShoupMultiplier(_secret_ntt(ctx), primes)
    encoder = s.CKKSEncoder(ctx.seal)
    encryptor = s.Encryptor(ctx.seal, ctx.secret_key)
    a = np.empty((block, limbs, n), dtype=np.uint64)
    c0 = np.empty((block, limbs, n), dtype=np.uint64)
    delta = np.empty((block, limbs, n), dtype=np.uint64)
    out = np.empty((count, prg_form.chunk_len(n, primes)), dtype=np.uint8)
    out[:, : prg_form.KEY_BYTES] = np.frombuffer(key, dtype=np.uint8)
    scratch = Scratch()
    try:
        for lo in range(0, count, block):
            b = min(lo + block, count) - lo
            for k in range(b):
                plain = s.Plaintext()
                encoder.encode(rows[lo + k].tolist(), scale, plain)
                blob = scratch.save(encryptor.encrypt_symmetric(plain))
                raw = reader.read(np.frombuffer(blob, dtype=np.uint8))
                if raw.seed is None or raw.prng_type is None:
                    raise HEKeyError("SEAL returned an unseeded symmetric ciphertext")
                c0[k] = raw.data.reshape(limbs, n)
                delta[k] = seeds.uniform(raw.prng_type, raw.seed, primes, n)  # a'
            expander.c1(key, lo, a[:b])
            borrow = delta[:b] < a[:b]  # delta := a' - a mod q
            np.subtract(delta[:b], a[:b], out=delta[:b])
            np.add(delta[:b], q, out=delta[:b], where=borrow)
            c0[:b] += secret.mul(delta[:b])  # both < q < 2^60: no overflow
            c0[:b] -= np.where(c0[:b] >= q, q, np.uint64(0))
            out[lo : lo + b, prg_form.KEY_BYTES :] = prg_form.pack_c0(c0[:b], primes)
    finally:
        scratch.close()
    return out.reshape(-1)


class _Loader:
    """Turns wire chunks into validated SEAL ciphertexts for one context (server or client)."""

    def __init__(self, ctx: PublicContext, scale_bits: int) -> None:
        self.ctx = ctx
        self.s = _sealapi()
        self.scale = _check_scale_bits(scale_bits)
        self.parms_id = ctx.first_parms_id
        self.primes = ctx.data_primes
        self.bits = [p.bit_length() for p in self.primes]
        self.n = ctx.preset.poly_modulus_degree
        self.packed_len = PACKED_SCALE.size + sum(2 * self.n * b // 8 for b in self.bits)
        self.max_seal_len = (
            2 * SEAL_HEADER_SIZE + CT_MEMBERS.size + 8 + 2 * self.n * len(self.primes) * 8
        ) + SEAL_BLOB_SLACK
        self.scratch = Scratch()

    def close(self) -> None:
        self.scratch.close()

    def check_header(self, chunk: memoryview, index: int) -> int:
        """A serialised SEAL ciphertext's size and header (version); its compression mode."""
        if len(chunk) > self.max_seal_len:
            raise CiphertextError(f"ciphertext {index}: {len(chunk)} bytes is too large")
        try:
            vmaj, vmin, compr, _ = parse_header(chunk)
        except ValueError as exc:
            raise CiphertextError(f"ciphertext {index}: {exc}") from None
        if (vmaj, vmin) != self.ctx.seal_version:
            raise CiphertextError(f"ciphertext {index}: SEAL version {vmaj}.{vmin}")
        return compr

    def load(self, chunk: memoryview, kind: Kind, index: int) -> Any:
        """Chunk `index` of a message of `kind` as a validated SEAL ciphertext."""
        if kind == "packed":
            data = self._unpack(chunk, index)
        elif kind == "prg":
            data = self._from_prg(chunk, index)
        else:
            self.check_header(chunk, index)
            data = chunk
        ct = self.s.Ciphertext()
        try:
            self.scratch.load(ct, self.ctx.seal, data)
        except Exception as exc:  # SEAL: ValueError/RuntimeError on invalid data
            raise CiphertextError(f"ciphertext {index} does not deserialise: {exc}") from None
        if (
            ct.size() != 2
            or list(ct.parms_id()) != self.parms_id
            or not ct.is_ntt_form()
            or ct.poly_modulus_degree() != self.n
            or ct.coeff_modulus_size() != len(self.primes)
        ):
            raise CiphertextError(f"ciphertext {index} has the wrong shape or parameter level")
        if ct.scale != self.scale:
            raise CiphertextError(
                f"ciphertext {index} has scale 2^{math.log2(ct.scale):.2f}, "
                f"expected 2^{math.log2(self.scale):.0f}"
            )
        return ct

    def _from_prg(self, chunk: memoryview, index: int) -> bytes:
        primes = tuple(self.primes)
        if len(chunk) != prg_form.chunk_len(self.n, primes):
            raise CiphertextError(
                f"prg ciphertext {index}: {len(chunk)} bytes, expected "
                f"{prg_form.chunk_len(self.n, primes)}"
            )
        buf = np.frombuffer(chunk, dtype=np.uint8)
        coeffs = np.empty((2, 1, len(primes), self.n), dtype=np.uint64)
        prg_form.unpack_c0(buf, 0, 1, buf.size, self.n, primes, coeffs[0])
        if np.any(coeffs[0] >= np.array(primes, dtype=np.uint64).reshape(1, -1, 1)):
            raise CiphertextError(f"prg ciphertext {index}: coefficient >= modulus")
        key = buf[: prg_form.KEY_BYTES].tobytes()
        prg_form.PrgExpander(self.n, primes, 1).c1(key, index, coeffs[1])
        return build_ciphertext_blob(
            version=self.ctx.seal_version,
            parms_id=self.parms_id,
            poly_modulus_degree=self.n,
            coeff_modulus_size=len(self.primes),
            scale=self.scale,
            coeffs=coeffs.reshape(-1),
        )

    def _unpack(self, chunk: memoryview, index: int) -> bytes:
        if len(chunk) != self.packed_len:
            raise CiphertextError(
                f"packed ciphertext {index}: {len(chunk)} bytes, expected {self.packed_len}"
            )
        (scale,) = PACKED_SCALE.unpack_from(chunk, 0)
        pos = PACKED_SCALE.size
        polys: list[np.ndarray] = []
        for _poly in range(2):
            for prime, bits in zip(self.primes, self.bits, strict=True):
                size = self.n * bits // 8
                v = unpack_uint(chunk[pos : pos + size], bits, self.n)
                pos += size
                if np.any(v >= np.uint64(prime)):
                    raise CiphertextError(f"packed ciphertext {index}: coefficient >= modulus")
                polys.append(v)
        return build_ciphertext_blob(
            version=self.ctx.seal_version,
            parms_id=self.parms_id,
            poly_modulus_degree=self.n,
            coeff_modulus_size=len(self.primes),
            scale=scale,
            coeffs=np.concatenate(polys),
        )

    def pack(self, ct: Any) -> bytes:
        """A full ciphertext, bit-packed at the primes' widths (the downlink form)."""
        total = 2 * len(self.primes) * self.n
        coeffs = np.fromiter(map(ct.__getitem__, range(total)), dtype=np.uint64, count=total)
        parts = [PACKED_SCALE.pack(ct.scale)]
        pos = 0
        for _poly in range(2):
            for bits in self.bits:
                parts.append(pack_uint(coeffs[pos : pos + self.n], bits))
                pos += self.n
        return b"".join(parts)


def _check_common(ev: EncryptedVector, ctx: PublicContext, dim: int, scale_bits: int) -> None:
    if ev.fingerprint != ctx.fingerprint:
        raise CiphertextError(
            f"encrypted under another key (fingerprint {ev.fingerprint[:12]}…, "
            f"expected {ctx.fingerprint[:12]}…)"
        )
    if ev.dim != dim:
        raise CiphertextError(f"vector length {ev.dim}, expected {dim}")
    if ev.scale_bits != scale_bits:
        raise CiphertextError(f"scale 2^{ev.scale_bits}, expected 2^{scale_bits}")
    expected = num_ciphertexts(dim, ctx.slots)
    if ev.count != expected:
        raise CiphertextError(f"{ev.count} ciphertexts, expected {expected}")


class EncryptedSum:
    """The server's streaming sum: one running sum, one reply in memory at a time.

    `add` validates a whole reply (every ciphertext parsed and checked) and adds it whole or
    not at all, so a bad reply is rejected without corrupting the sum. Works with a
    `PublicContext`: it never needs, and never gets, the secret key. Both backends give the
    same sum bit for bit (modular addition is exact); "limbs" is the fast one.
    """

    def __init__(
        self,
        ctx: PublicContext,
        *,
        dim: int,
        scale_bits: int,
        max_terms: int,
        backend: SumBackend = "auto",
        threads: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.dim = dim
        self.scale_bits = scale_bits
        self.max_terms = max_terms
        self.num_terms = 0
        lib = native()
        if backend == "auto":
            backend = "limbs" if lib is not None else "seal"
        if backend not in ("limbs", "seal"):
            raise ValueError(f"unknown sum backend {backend!r}")
        self.backend = backend
        self._loader = _Loader(ctx, scale_bits)
        self._limbs: LimbSum | None = None
        if backend == "limbs":
            layout = LimbLayout(
                version=ctx.seal_version,
                parms_id=tuple(self._loader.parms_id),
                poly_modulus_degree=self._loader.n,
                primes=tuple(self._loader.primes),
                scale=self._loader.scale,
            )
            self._limbs = LimbSum(layout, num_ciphertexts(dim, ctx.slots), lib, threads)
        self._evaluator = _sealapi().Evaluator(ctx.seal)
        self._running: list[Any] | None = None

    def add(self, ev: EncryptedVector) -> None:
        """Validate and add one reply; CiphertextError (running sum untouched) if it is bad."""
        if ev.kind not in UPLINK_KINDS:
            raise CiphertextError(f"a client reply must be prg/seeded/full, got {ev.kind!r}")
        if ev.num_terms != 1:
            raise CiphertextError(f"a client reply sums {ev.num_terms} vectors, expected 1")
        _check_common(ev, self.ctx, self.dim, self.scale_bits)
        if self.num_terms + ev.num_terms > self.max_terms:
            raise CiphertextError(
                f"more than aggregation.max_clients={self.max_terms} replies: the sum could "
                "leave the range the parameters were checked for"
            )
        if self._limbs is not None:
            verify = None
            if ev.unverified_digest is not None:  # hash while the workers sum
                pending = self._limbs.pool.submit(ev.verified)

                def verify() -> None:
                    pending.result()

            try:
                if ev.kind == "prg":
                    self._limbs.add_prg(ev.blob, ev.lengths, verify)
                else:
                    self._add_limbs(ev, verify)
            finally:
                if verify is not None:
                    pending.exception()  # never leave the hash running behind an error
        else:
            ev = ev.verified()
            cts = [self._loader.load(c, ev.kind, i) for i, c in enumerate(ev.chunks())]
            if self._running is None:
                self._running = cts
            else:
                for acc, ct in zip(self._running, cts, strict=True):
                    self._evaluator.add_inplace(acc, ct)
        self.num_terms += ev.num_terms

    def _add_limbs(self, ev: EncryptedVector, verify: Callable[[], None] | None) -> None:
        assert self._limbs is not None
        for i, chunk in enumerate(ev.chunks()):  # cheap pre-check: sizes and headers only
            compr = self._loader.check_header(chunk, i)
            if not self._limbs.supports(compr):
                raise CiphertextError(f"ciphertext {i}: unsupported compression mode {compr}")
        self._limbs.add(ev.blob, ev.lengths, verify)

    def result(self) -> EncryptedVector:
        """The encrypted sum in packed downlink form."""
        if self._limbs is not None:
            if self.num_terms == 0:
                raise CiphertextError("no valid encrypted reply to aggregate")
            rows, digest = self._limbs.packed(self._loader.bits,
                                              PACKED_SCALE.pack(self._loader.scale))
            return EncryptedVector(
                kind="packed",
                fingerprint=self.ctx.fingerprint,
                dim=self.dim,
                scale_bits=self.scale_bits,
                num_terms=self.num_terms,
                lengths=np.full(rows.shape[0], rows.shape[1], dtype=np.int64),
                blob=rows.reshape(-1),
            )._with_digest(digest)
        if self._running is None:
            raise CiphertextError("no valid encrypted reply to aggregate")
        parts = [self._loader.pack(ct) for ct in self._running]
        return EncryptedVector(
            kind="packed",
            fingerprint=self.ctx.fingerprint,
            dim=self.dim,
            scale_bits=self.scale_bits,
            num_terms=self.num_terms,
            lengths=np.array([len(p) for p in parts], dtype=np.int64),
            blob=np.frombuffer(b"".join(parts), dtype=np.uint8).copy(),
        )

    def close(self) -> None:
        self._loader.close()
        if self._limbs is not None:
            self._limbs.close()


def aggregate(
    ctx: PublicContext,
    replies: list[EncryptedVector],
    *,
    scale_bits: int,
    max_terms: int,
    backend: SumBackend = "auto",
) -> EncryptedVector:
    """Sum all replies (all must be valid; convenience for tests and benchmarks)."""
    acc = EncryptedSum(
        ctx, dim=replies[0].dim, scale_bits=scale_bits, max_terms=max_terms, backend=backend
    )
    try:
        for r in replies:
            acc.add(r)
        return acc.result()
    finally:
        acc.close()


@dataclass(frozen=True)
class DecryptedMean:
    """The decrypted weighted mean and what it was computed from."""

    mean: np.ndarray  # float64, length dim
    total_weight: int
    num_terms: int
    error_bound: float  # high-probability bound on |mean - exact mean| per value


def decrypt_mean(
    ctx: PublicContext,
    ev: EncryptedVector,
    *,
    dim: int | None = None,
    scale_bits: int | None = None,
    max_weight: int | None = None,
    max_abs_value: float | None = None,
) -> DecryptedMean:
    """Decrypt an encrypted (weighted) sum, verify it, and divide by its total weight.

    Only a key holder can do this: a PublicContext (the server's) raises HEKeyError.
    Raises AggregateCheckError (see the module docstring) unless every check slot decrypts to
    the number of summed vectors, the total weight is an integer in [m, m * max_weight] and
    (when `max_abs_value` is given) the weighted values stay within +-max_abs_value.
    """
    if not getattr(ctx, "has_secret_key", False) or not isinstance(ctx, SecretContext):
        raise HEKeyError(
            "this context holds no secret key: the server cannot decrypt (by design)"
        )
    dim = ev.dim if dim is None else dim
    scale_bits = ev.scale_bits if scale_bits is None else scale_bits
    _check_common(ev, ctx, dim, scale_bits)
    if ev.num_terms < 1:
        raise CiphertextError("encrypted sum of zero vectors")
    s = _sealapi()
    loader = _Loader(ctx, scale_bits)
    decryptor = s.Decryptor(ctx.seal, ctx.secret_key)
    encoder = s.CKKSEncoder(ctx.seal)
    slots = ctx.slots
    rows = np.empty((ev.count, slots), dtype=np.float64)
    try:
        for i, chunk in enumerate(ev.chunks()):
            ct = loader.load(chunk, ev.kind, i)
            plain = s.Plaintext()
            decryptor.decrypt(ct, plain)
            rows[i] = encoder.decode_double(plain)
    finally:
        loader.close()
    bound = noise_bound(ctx.preset.poly_modulus_degree, ev.num_terms) / 2.0**scale_bits
    terms = ev.num_terms
    checks = rows[:, slots - 1]
    worst = float(np.max(np.abs(checks - CHECK_VALUE * terms)))
    if not worst <= bound:  # also catches NaN
        raise AggregateCheckError(
            f"check slots are off by up to {worst:.4g} from {terms} (bound {bound:.2g}): a "
            "summed ciphertext was random, corrupted or made under another key"
        )
    values = rows[:, : slots - 1].reshape(-1)[: dim + 1]
    raw_weight = float(values[dim])
    total = round(raw_weight)
    limit = terms * (max_weight if max_weight is not None else math.inf)
    if not terms <= total <= limit or abs(raw_weight - total) > WEIGHT_ROUNDING_TOLERANCE:
        raise AggregateCheckError(
            f"decrypted total weight {raw_weight:.4g} is not a valid example count for "
            f"{terms} replies: the sum overflowed or a reply was malformed"
        )
    if max_abs_value is not None and dim:
        peak = float(np.max(np.abs(values[:dim])))
        if not peak <= max_abs_value * total + bound:
            raise AggregateCheckError(
                f"a weighted value of magnitude {peak:.4g} exceeds max_abs_value * total "
                f"weight = {max_abs_value * total:.4g}: a reply broke the value bounds"
            )
    return DecryptedMean(
        mean=values[:dim] / total,
        total_weight=total,
        num_terms=terms,
        error_bound=bound / total,
    )
