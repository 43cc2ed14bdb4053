"""CKKS encrypted averaging: client encryption, validated streaming sum, key-holder decryption.

Flow: a client flattens its model, multiplies by its weight n_k (an integer, its number of
examples), appends n_k, splits the vector into chunks of `slots - 1` values, puts the check
constant 1 into the last slot of every chunk and encrypts each chunk with SEAL's symmetric
encryption under the shared secret key. Symmetric encryption is allowed
because every client is a key holder, and it is what makes *seeded* ciphertexts possible: the
uniformly random half of a fresh ciphertext is replaced by the 64-byte PRNG seed it was
expanded from, halving the uplink. The server only ever holds a `PublicContext`: it loads each
reply through SEAL's validating loader, checks fingerprint/count/scale/level, adds reply by
reply into one running ciphertext vector and sends the sum back bit-packed at the prime's width.
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
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedstack.strategies.he.keys import HEKeyError, PublicContext, SecretContext, _sealapi
from fedstack.strategies.he.presets import noise_bound
from fedstack.strategies.he.seal_io import (
    CT_MEMBERS,
    SEAL_HEADER_SIZE,
    Scratch,
    build_ciphertext_blob,
    pack_uint,
    parse_header,
    unpack_uint,
)

WIRE_FORMAT = "fedstack-ckks-vector"
#: 2: every ciphertext's last slot is a check slot (version 1 had none).
WIRE_VERSION = 2
# Keys of the wire form inside an ArrayRecord.
META_KEY = "he.meta"
LENGTHS_KEY = "he.lengths"
BLOB_KEY = "he.blob"
WIRE_KEYS = (META_KEY, LENGTHS_KEY, BLOB_KEY)
# Uplink kinds are SEAL blobs (seeded = half size; full = plain symmetric ciphertext); the
# downlink aggregate is "packed": per ciphertext its scale (f64) + coefficients bit-packed.
Kind = Literal["seeded", "full", "packed"]
UPLINK_KINDS = ("seeded", "full")
PACKED_SCALE = struct.Struct("<d")
# Slack over the uncompressed size of a SEAL ciphertext blob: seed info and zstd framing.
SEAL_BLOB_SLACK = 512
MAX_META_BYTES = 4096
#: What each contribution puts into the check slot of each of its ciphertexts.
CHECK_VALUE = 1.0
#: The decrypted total weight must be this close to an integer (weights are example counts;
#: the capacity check keeps the real error orders of magnitude below).
WEIGHT_ROUNDING_TOLERANCE = 0.25


class CiphertextError(ValueError):
    """An encrypted message that must be rejected; the message says why."""


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
    node authentication are Flower's job).
    """

    kind: Kind
    fingerprint: str
    dim: int
    scale_bits: int
    num_terms: int
    lengths: np.ndarray  # int64, bytes per ciphertext
    blob: np.ndarray  # uint8, all ciphertexts back to back

    @property
    def count(self) -> int:
        return int(self.lengths.size)

    @property
    def nbytes(self) -> int:
        return int(self.blob.nbytes + self.lengths.nbytes)

    def digest(self) -> str:
        return hashlib.sha256(self.blob.tobytes()).hexdigest()

    def chunks(self) -> list[memoryview]:
        mv = memoryview(self.blob.tobytes())
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

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EncryptedVector:
        """Parse the wire form; CiphertextError on any structural problem (not yet crypto)."""
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
        if kind not in ("seeded", "full", "packed"):
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
        ev = cls(
            kind=kind,
            fingerprint=str(meta.get("fingerprint")),
            dim=meta["dim"],
            scale_bits=meta["scale_bits"],
            num_terms=meta["num_terms"],
            lengths=lengths,
            blob=blob,
        )
        if ev.digest() != meta.get("digest"):
            raise CiphertextError("ciphertext digest mismatch (corrupted or tampered in transit)")
        return ev


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
) -> EncryptedVector:
    """Encrypt (weight * values, weight) under the client's secret key.

    Refuses values outside +-max_abs_value and weights above max_weight: those bounds are what
    the configuration's overflow check assumed, and a silent wrap-around would corrupt the sum.
    """
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
    encoder = s.CKKSEncoder(ctx.seal)
    encryptor = s.Encryptor(ctx.seal, ctx.secret_key)
    scratch = Scratch()
    parts: list[bytes] = []
    try:
        for i in range(count):
            plain = s.Plaintext()
            encoder.encode(rows[i].tolist(), scale, plain)
            if seeded:
                parts.append(scratch.save(encryptor.encrypt_symmetric(plain)))
            else:
                ct = s.Ciphertext()
                encryptor.encrypt_symmetric(plain, ct)
                parts.append(scratch.save(ct))
    finally:
        scratch.close()
    return EncryptedVector(
        kind="seeded" if seeded else "full",
        fingerprint=ctx.fingerprint,
        dim=int(vec.size),
        scale_bits=scale_bits,
        num_terms=1,
        lengths=np.array([len(p) for p in parts], dtype=np.int64),
        blob=np.frombuffer(b"".join(parts), dtype=np.uint8).copy(),
    )


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

    def load(self, chunk: memoryview, kind: Kind, index: int) -> Any:
        if kind == "packed":
            data = self._unpack(chunk, index)
        else:
            if len(chunk) > self.max_seal_len:
                raise CiphertextError(f"ciphertext {index}: {len(chunk)} bytes is too large")
            try:
                vmaj, vmin, _, _ = parse_header(chunk)
            except ValueError as exc:
                raise CiphertextError(f"ciphertext {index}: {exc}") from None
            if (vmaj, vmin) != self.ctx.seal_version:
                raise CiphertextError(f"ciphertext {index}: SEAL version {vmaj}.{vmin}")
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
    """The server's streaming sum: one running ciphertext vector, one reply in memory at a time.

    `add` validates a whole reply (every ciphertext deserialised and checked) before touching
    the running sum, so a bad reply is rejected without corrupting it. Works with a
    `PublicContext`: it never needs, and never gets, the secret key.
    """

    def __init__(self, ctx: PublicContext, *, dim: int, scale_bits: int, max_terms: int) -> None:
        self.ctx = ctx
        self.dim = dim
        self.scale_bits = scale_bits
        self.max_terms = max_terms
        self.num_terms = 0
        self._loader = _Loader(ctx, scale_bits)
        self._evaluator = _sealapi().Evaluator(ctx.seal)
        self._running: list[Any] | None = None

    def add(self, ev: EncryptedVector) -> None:
        """Validate and add one reply; CiphertextError (running sum untouched) if it is bad."""
        if ev.kind not in UPLINK_KINDS:
            raise CiphertextError(f"a client reply must be seeded/full, got {ev.kind!r}")
        if ev.num_terms != 1:
            raise CiphertextError(f"a client reply sums {ev.num_terms} vectors, expected 1")
        _check_common(ev, self.ctx, self.dim, self.scale_bits)
        if self.num_terms + ev.num_terms > self.max_terms:
            raise CiphertextError(
                f"more than aggregation.max_clients={self.max_terms} replies: the sum could "
                "leave the range the parameters were checked for"
            )
        cts = [self._loader.load(c, ev.kind, i) for i, c in enumerate(ev.chunks())]
        if self._running is None:
            self._running = cts
        else:
            for acc, ct in zip(self._running, cts, strict=True):
                self._evaluator.add_inplace(acc, ct)
        self.num_terms += ev.num_terms

    def result(self) -> EncryptedVector:
        """The encrypted sum in packed downlink form."""
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


def aggregate(
    ctx: PublicContext, replies: list[EncryptedVector], *, scale_bits: int, max_terms: int
) -> EncryptedVector:
    """Sum all replies (all must be valid; convenience for tests and benchmarks)."""
    acc = EncryptedSum(ctx, dim=replies[0].dim, scale_bits=scale_bits, max_terms=max_terms)
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
