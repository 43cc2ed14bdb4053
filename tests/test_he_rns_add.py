"""The limb-wise encrypted sum (`rns_add`): bit-for-bit SEAL's sum, SEAL's seed expansion,
every SEAL compression mode, and clear refusals of malformed or foreign ciphertexts."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib

import numpy as np
import pytest

from fedstack.strategies.he import rns_add
from fedstack.strategies.he.ckks import (
    CiphertextError,
    EncryptedSum,
    EncryptedVector,
    aggregate,
    decrypt_mean,
    encrypt_update,
)
from fedstack.strategies.he.keys import _sealapi, generate_keys
from fedstack.strategies.he.presets import DEFAULT_PRESET, PRESETS
from fedstack.strategies.he.prg_form import (
    KEY_BYTES,
    SPARE_BASE,
    SPARE_STRIDE,
    PrgExpander,
    ShoupMultiplier,
    chunk_len,
    pack_c0,
    unpack_c0,
)
from fedstack.strategies.he.seal_io import (
    COMPR_NONE,
    COMPR_ZLIB,
    COMPR_ZSTD,
    CT_MEMBERS,
    PRNG_INFO_SIZE,
    SEAL_HEADER,
    SEAL_HEADER_SIZE,
    SEAL_MAGIC,
    CiphertextReader,
    Scratch,
    pack_rows,
    pack_uint,
    parse_header,
)
from fedstack.strategies.he.seal_native import native
from fedstack.strategies.he.seal_prng import (
    PRNG_BLAKE2XB,
    PRNG_SHAKE256,
    SeedExpander,
    max_multiple,
)

pytestmark = pytest.mark.skipif(native() is None, reason="TenSEAL build hides SEAL's zstd/BLAKE2xb")

SCALE_BITS = 25
MAX_ABS = 16.0
MAX_WEIGHT = 1000
DIM = 5000  # 3 ciphertexts at N=4096, 5 at N=2048


@pytest.fixture(scope="module")
def keys():
    return {name: generate_keys(p) for name, p in PRESETS.items()}


def _replies(ctx, k=3, *, kind="seeded", dim=DIM, seed=0):
    """Replies in `kind` form; SEAL's own seeded form unless asked otherwise."""
    rng = np.random.default_rng(seed)
    vecs = [rng.normal(0.0, 0.2, dim) for _ in range(k)]
    reps = [encrypt_update(ctx, v, 10 + i, scale_bits=SCALE_BITS, max_abs_value=MAX_ABS,
                           max_weight=MAX_WEIGHT, kind=kind) for i, v in enumerate(vecs)]
    return vecs, reps


def _members(chunk) -> bytes:
    """A SEAL blob's members, decompressed (whatever its mode)."""
    _, _, compr, _ = parse_header(chunk)
    body = bytes(chunk[SEAL_HEADER_SIZE:])
    if compr == COMPR_NONE:
        return body
    if compr == COMPR_ZLIB:
        return zlib.decompress(body)
    out = np.empty(1 << 20, dtype=np.uint8)
    src = np.frombuffer(body, dtype=np.uint8)
    size = native().zstd_decompress(out.ctypes.data, out.size, src.ctypes.data, src.size)
    return out[:size].tobytes()


def _blob(members: bytes, compr: int, version: tuple[int, int]) -> bytes:
    body = zlib.compress(members) if compr == COMPR_ZLIB else members
    return SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER_SIZE, *version, compr, 0,
                            SEAL_HEADER_SIZE + len(body)) + body


def _reencode(chunk, compr: int) -> bytes:
    vmaj, vmin, _, _ = parse_header(chunk)
    return _blob(_members(chunk), compr, (vmaj, vmin))


def _with_chunks(ev: EncryptedVector, chunks: list[bytes]) -> EncryptedVector:
    """The reply with other ciphertext bytes, through the wire form (digest recomputed)."""
    new = dataclasses.replace(ev, lengths=np.array([len(c) for c in chunks], dtype=np.int64),
                              blob=np.frombuffer(b"".join(chunks), dtype=np.uint8).copy())
    return EncryptedVector.from_arrays(new.to_arrays())


def _sum(ctx, reps, backend, **kw):
    return aggregate(ctx.public_only(), reps, scale_bits=SCALE_BITS, max_terms=100,
                     backend=backend, **kw)


def _reference(vecs, weights):
    return sum(w * v for w, v in zip(weights, vecs, strict=True)) / float(sum(weights))


# ------------------------------------------------------------ equal to SEAL's own add


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("kind", ["prg", "seeded", "full"])
def test_limb_sum_is_seals_sum_bit_for_bit(keys, preset, kind):
    ctx = keys[preset]
    vecs, reps = _replies(ctx, kind=kind)
    ours = _sum(ctx, reps, "limbs")
    seal = _sum(ctx, reps, "seal")
    assert ours.kind == seal.kind == "packed"
    assert np.array_equal(ours.lengths, seal.lengths)
    assert np.array_equal(ours.blob, seal.blob)  # modular addition is exact
    res = decrypt_mean(ctx, EncryptedVector.from_arrays(ours.to_arrays()), max_weight=MAX_WEIGHT)
    assert res.total_weight == 10 + 11 + 12
    assert np.max(np.abs(res.mean - _reference(vecs, [10, 11, 12]))) <= res.error_bound


@pytest.mark.parametrize("compr", [COMPR_NONE, COMPR_ZLIB])
def test_uncompressed_and_zlib_ciphertexts_add_like_zstd_ones(keys, compr):
    """SEAL itself loads our re-encodings (the seal backend), and the limb sum agrees."""
    ctx = keys[DEFAULT_PRESET]
    _, reps = _replies(ctx)
    recoded = [_with_chunks(r, [_reencode(c, compr) for c in r.chunks()]) for r in reps]
    assert parse_header(recoded[0].chunks()[0])[2] == compr
    mixed = [recoded[0], reps[1], recoded[2]]
    reference = _sum(ctx, reps, "seal")
    for backend in ("seal", "limbs"):
        assert np.array_equal(_sum(ctx, mixed, backend).blob, reference.blob)
        assert np.array_equal(_sum(ctx, recoded, backend).blob, reference.blob)


def test_lazy_reduction_and_a_mix_of_reply_forms(keys):
    ctx = keys["compact"]
    _, seeded = _replies(ctx, 3)
    _, full = _replies(ctx, 2, kind="full", seed=1)
    _, prg = _replies(ctx, 2, kind="prg", seed=2)
    reps = [*seeded, *prg, *full]
    acc = EncryptedSum(ctx.public_only(), dim=DIM, scale_bits=SCALE_BITS, max_terms=100,
                       backend="limbs")
    acc._limbs._headroom = 2  # reduce every other reply
    for r in reps:
        acc.add(r)
    assert np.array_equal(acc.result().blob, _sum(ctx, reps, "seal").blob)


# -------------------------------------------------------------------- seed expansion


def _seal_c1(ctx, chunk) -> np.ndarray:
    """c1 as SEAL expands it when loading the blob."""
    s = _sealapi()
    scratch = Scratch()
    try:
        ct = scratch.load(s.Ciphertext(), ctx.seal, bytes(chunk))
    finally:
        scratch.close()
    words = len(ctx.data_primes) * ctx.preset.poly_modulus_degree
    return np.array([ct[words + i] for i in range(words)], dtype=np.uint64)


@pytest.mark.parametrize("prng_type", [PRNG_BLAKE2XB, PRNG_SHAKE256])
def test_seed_expansion_is_seals(keys, prng_type):
    ctx = keys[DEFAULT_PRESET]
    _, reps = _replies(ctx, 1)
    n = ctx.preset.poly_modulus_degree
    primes = tuple(ctx.data_primes)
    for chunk in reps[0].chunks():
        members = bytearray(_members(chunk))
        info = len(members) - PRNG_INFO_SIZE
        assert members[info + SEAL_HEADER_SIZE] == PRNG_BLAKE2XB  # SEAL's default PRNG
        members[info + SEAL_HEADER_SIZE] = prng_type  # SEAL then expands with this PRNG
        blob = _blob(bytes(members), COMPR_NONE, parse_header(chunk)[:2])
        raw = CiphertextReader(n, len(primes), native()).read(np.frombuffer(blob, np.uint8))
        assert raw.prng_type == prng_type and raw.seed is not None
        ours = SeedExpander(native()).uniform(prng_type, raw.seed, primes, n)
        assert np.array_equal(ours.reshape(-1), _seal_c1(ctx, blob))


def test_rejected_words_are_redrawn_in_seals_order():
    """Primes just above 2^63 reject ~half the words: check the redraw order against a
    direct transcription of SEAL's `sample_poly_uniform` loop."""
    expander = SeedExpander(native())
    primes = (2**63 + 1, 2**63 + 1001)
    n = 512
    seed = hashlib.sha512(b"fedstack").digest()
    stream = np.empty(64 * 512, dtype=np.uint64)
    expander.stream(PRNG_BLAKE2XB, seed, stream)
    words = [int(w) for w in stream]
    pos = len(primes) * n
    expected = []
    for j, q in enumerate(primes):
        limit = max_multiple(q)
        for i in range(n):
            r = words[j * n + i]
            while r >= limit:
                r = words[pos]
                pos += 1
            expected.append(r % q)
    assert pos > len(primes) * n + 400  # many redraws, some chained
    ours = expander.uniform(PRNG_BLAKE2XB, seed, primes, n)
    assert ours.reshape(-1).tolist() == expected


def test_pack_rows_is_pack_uint_per_row():
    rng = np.random.default_rng(0)
    for bits in (40, 54, 55, 60):
        v = rng.integers(0, 2**bits, (5, 64), dtype=np.uint64)
        rows = pack_rows(v, bits)
        for r in range(5):
            assert rows[r].tobytes() == pack_uint(v[r], bits)


# ------------------------------------------------------------------------ refusals


def _patched(chunk, offset: int, data: bytes, compr: int = COMPR_NONE) -> bytes:
    members = bytearray(_members(chunk))
    members[offset : offset + len(data)] = data
    return _blob(bytes(members), compr, parse_header(chunk)[:2])


def _refused(ctx, reply, match):
    acc = EncryptedSum(ctx.public_only(), dim=reply.dim, scale_bits=SCALE_BITS, max_terms=9,
                       backend="limbs")
    with pytest.raises(CiphertextError, match=match):
        acc.add(reply)


def test_malformed_ciphertexts_are_refused_with_a_reason(keys):
    ctx = keys[DEFAULT_PRESET]
    _, reps = _replies(ctx, 1)
    good = reps[0]
    chunks = [bytes(c) for c in good.chunks()]
    assert parse_header(chunks[1])[2] == COMPR_ZSTD  # what SEAL writes
    scale_at = 4 * 8 + 1 + 3 * 8  # parms_id, is_ntt_form, size, N, L
    coeff_at = CT_MEMBERS.size + SEAL_HEADER_SIZE + 8
    info_type_at = len(_members(chunks[0])) - PRNG_INFO_SIZE + SEAL_HEADER_SIZE
    cases = {
        "scale": _patched(chunks[1], scale_at, struct.pack("<d", 2.0**26)),
        "PRNG type": _patched(chunks[1], info_type_at, b"\x07"),
        "modulus": _patched(chunks[1], coeff_at, struct.pack("<Q", 2**64 - 1), COMPR_ZLIB),
        "parameter": _patched(chunks[1], 0, struct.pack("<Q", 12345)),
        "shape": _patched(chunks[1], 4 * 8, b"\x00"),  # not NTT form
        "members are": _blob(_members(chunks[1]) + b"\x00" * 8, COMPR_NONE,
                             parse_header(chunks[1])[:2]),
        "magic": bytes(len(chunks[1])),
    }
    as_zlib = bytearray(chunks[1])
    as_zlib[5] = COMPR_ZLIB  # the header's compression mode byte: a zstd stream is no zlib
    cases["zlib"] = bytes(as_zlib)
    # A zstd stream with garbage in its middle.
    bad_zstd = bytearray(chunks[1])
    bad_zstd[SEAL_HEADER_SIZE + 4 : SEAL_HEADER_SIZE + 64] = bytes(60)
    cases["ciphertext 1"] = bytes(bad_zstd)
    for match, bad in cases.items():
        _refused(ctx, _with_chunks(good, [chunks[0], bad, chunks[2]]), match)


def test_reply_under_other_parameters_is_refused(keys):
    """The 'precise' preset has the same N (same ciphertext count) but another prime."""
    ctx = keys[DEFAULT_PRESET]
    _, reps = _replies(keys["precise"], 1)
    foreign = dataclasses.replace(reps[0], fingerprint=ctx.fingerprint)
    _refused(ctx, EncryptedVector.from_arrays(foreign.to_arrays()), "parameter")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kind", ["seeded", "prg"])
def test_a_bad_late_ciphertext_leaves_the_sum_as_it_was(keys, monkeypatch, threads, kind):
    """Blocks of 2 ciphertexts: blocks already added (by any worker) are subtracted again."""
    ctx = keys["compact"]
    monkeypatch.setattr(rns_add, "BLOCK_BYTES", 2 * 2 * 2048 * 8)
    monkeypatch.setattr(rns_add, "default_threads", lambda: threads)
    dim = 12_000  # 12 ciphertexts at N=2048: six blocks
    _, reps = _replies(ctx, 3, dim=dim)
    chunks = [bytes(c) for c in reps[1].chunks()]
    # A valid SEAL header (passes the cheap pre-check) over a coefficient above its prime.
    coeff_at = CT_MEMBERS.size + SEAL_HEADER_SIZE + 8
    chunks[-1] = _patched(chunks[-1], coeff_at, struct.pack("<Q", 2**64 - 1))
    broken = _with_chunks(reps[1], chunks)
    acc = EncryptedSum(ctx.public_only(), dim=dim, scale_bits=SCALE_BITS, max_terms=9,
                       backend="limbs")
    assert acc._limbs.block == 2 and len(chunks) == 12 and acc._limbs.threads == threads
    acc.add(reps[0])
    with pytest.raises(CiphertextError, match=rf"ciphertext {len(chunks) - 1}: .*modulus"):
        acc.add(broken)
    acc.add(reps[2])
    assert acc.num_terms == 2
    expected = _sum(ctx, [reps[0], reps[2]], "seal")
    assert np.array_equal(acc.result().blob, expected.blob)


# ------------------------------------------------------------------------ the prg form


def _spec_c1(key: bytes, index: int, primes: tuple[int, ...], n: int) -> list[int]:
    """`prg_form`'s c1 of ciphertext `index`, transcribed from its docstring, in Python ints."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    def words(counter: int, count: int) -> list[int]:
        enc = Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
        data = enc.update(bytes(8 * count))
        return [int.from_bytes(data[8 * t : 8 * t + 8], "little") for t in range(count)]

    limbs = len(primes)
    bulk = words(index * limbs * n * 8 // 16, limbs * n)
    out = []
    for j, q in enumerate(primes):
        shift = 64 - q.bit_length()
        spare = iter(w >> shift for w in words(SPARE_BASE + (index * limbs + j) * SPARE_STRIDE,
                                               4 * n))
        for w in bulk[j * n : (j + 1) * n]:
            value = w >> shift
            while value >= q:
                value = next(spare)
            out.append(value)
    return out


def test_prg_c1_follows_its_specification_including_rejections():
    """Primes just above 2^63 (bits 64) reject about half the words; 2^55-ish ones almost none."""
    key = hashlib.sha256(b"fedstack").digest()
    n = 512
    for primes in [(2**63 + 1, 2**63 + 1001), (36028797018652673,)]:
        out = np.empty((3, len(primes), n), dtype=np.uint64)
        PrgExpander(n, primes, 3).c1(key, 5, out)
        for k in range(3):
            assert out[k].reshape(-1).tolist() == _spec_c1(key, 5 + k, primes, n)


def test_c0_byte_packing_roundtrips_including_the_last_chunk():
    rng = np.random.default_rng(1)
    primes = (2**54 - 33, 2**40 - 87, 2**60 - 93)  # widths 7, 5, 8
    n, count = 64, 5
    c0 = np.stack([rng.integers(0, q, (count, n), dtype=np.uint64) for q in primes], axis=1)
    size = chunk_len(n, primes)
    rows = np.zeros((count, size), dtype=np.uint8)
    rows[:, KEY_BYTES:] = pack_c0(c0, primes)
    assert size == KEY_BYTES + n * (7 + 5 + 8)
    out = np.empty_like(c0)
    unpack_c0(rows.reshape(-1), 0, count, size, n, primes, out)  # last row: padded path
    assert np.array_equal(out, c0)
    out2 = np.empty((2, len(primes), n), dtype=np.uint64)
    unpack_c0(rows.reshape(-1), size, 2, size, n, primes, out2)  # rows 1..2: direct path
    assert np.array_equal(out2, c0[1:3])


def test_prg_reply_with_chunks_under_different_keys_adds_correctly(keys):
    """Chunks carry their own key: a reply mixing two replies' chunks is still exact."""
    ctx = keys["compact"]
    _, reps = _replies(ctx, 2, kind="prg")
    a, b = ([bytes(c) for c in r.chunks()] for r in reps)
    mixed = _with_chunks(reps[0], [a[0], b[1], a[2], b[3], a[4]])
    assert np.array_equal(_sum(ctx, [mixed, reps[1]], "limbs").blob,
                          _sum(ctx, [mixed, reps[1]], "seal").blob)


def test_prg_replies_of_the_wrong_size_or_range_are_refused(keys):
    ctx = keys[DEFAULT_PRESET]
    _, reps = _replies(ctx, 1, kind="prg")
    chunks = [bytes(c) for c in reps[0].chunks()]
    _refused(ctx, _with_chunks(reps[0], [chunks[0], chunks[1][:-7], chunks[2]]),
             "another preset, or truncated")
    high = chunks[2][: KEY_BYTES] + b"\xff" * 7 + chunks[2][KEY_BYTES + 7 :]
    _refused(ctx, _with_chunks(reps[0], [chunks[0], chunks[1], high]), r"ciphertext 2: .*modulus")


@pytest.mark.parametrize("backend", ["limbs", "seal"])
def test_a_deferred_digest_is_checked_by_the_sum_and_a_mismatch_undoes_it(keys, backend):
    """`from_arrays(verify_digest=False)`: the sum hashes while it adds; tampering that
    parses fine (a c0 byte of the prg form) is still refused, and the sum is unchanged."""
    ctx = keys[DEFAULT_PRESET]
    _, reps = _replies(ctx, 3, kind="prg")
    tampered = reps[1].to_arrays()
    tampered["he.blob"] = tampered["he.blob"].copy()
    tampered["he.blob"][KEY_BYTES + 3] ^= 0x01  # a low byte of c0: still below the prime
    acc = EncryptedSum(ctx.public_only(), dim=DIM, scale_bits=SCALE_BITS, max_terms=9,
                       backend=backend)
    acc.add(EncryptedVector.from_arrays(reps[0].to_arrays(), verify_digest=False))
    with pytest.raises(CiphertextError, match="digest"):
        acc.add(EncryptedVector.from_arrays(tampered, verify_digest=False))
    with pytest.raises(CiphertextError, match="digest"):
        EncryptedVector.from_arrays(tampered)  # the default still checks it at once
    acc.add(EncryptedVector.from_arrays(reps[2].to_arrays(), verify_digest=False))
    assert acc.num_terms == 2
    assert np.array_equal(acc.result().blob, _sum(ctx, [reps[0], reps[2]], "seal").blob)


def test_without_seals_native_functions_everything_falls_back_to_seal(keys, monkeypatch):
    """Another TenSEAL build may hide zstd/BLAKE2xb: clients send SEAL-seeded replies, the
    server sums through SEAL, and "prg" replies from other clients still add up."""
    from fedstack.strategies.he import ckks

    ctx = keys[DEFAULT_PRESET]
    vecs, prg = _replies(ctx, 2, kind="prg")
    monkeypatch.setattr(ckks, "native", lambda: None)
    fallback = encrypt_update(ctx, vecs[0], 12, scale_bits=SCALE_BITS, max_abs_value=MAX_ABS,
                              max_weight=MAX_WEIGHT)
    assert fallback.kind == "seeded"
    acc = EncryptedSum(ctx.public_only(), dim=DIM, scale_bits=SCALE_BITS, max_terms=9)
    assert acc.backend == "seal"
    for r in [*prg, fallback]:
        acc.add(r)
    res = decrypt_mean(ctx, acc.result(), max_weight=MAX_WEIGHT)
    assert res.total_weight == 10 + 11 + 12
    ref = _reference([vecs[0], vecs[1], vecs[0]], [10, 11, 12])
    assert np.max(np.abs(res.mean - ref)) <= res.error_bound


def test_shoup_multiplication_is_exact_up_to_60_bit_primes():
    rng = np.random.default_rng(3)
    n = 64
    for primes in [(36028797018652673,), (2**60 - 93, 2**40 - 87)]:
        w = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes])
        x = np.stack([rng.integers(0, q, (4, n), dtype=np.uint64) for q in primes], axis=1)
        w[:, 0] = x[0, :, 0] = [q - 1 for q in primes]  # the largest operands
        got = ShoupMultiplier(w, primes).mul(x)
        want = [[[int(x[b, j, i]) * int(w[j, i]) % q for i in range(n)]
                 for j, q in enumerate(primes)] for b in range(4)]
        assert got.tolist() == want
