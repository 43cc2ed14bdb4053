"""Ed25519 statements: canonical encoding, domain separation, strict key files."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from fedstack.crypto import signing


@pytest.fixture(scope="module")
def key():
    return signing.generate()


def test_sign_verify_roundtrip_and_sizes(key):
    msg = signing.statement("secagg/advert", 7, 3, b"\x01" * 32)
    sig = signing.sign(key, msg)
    public = signing.public_bytes(key)
    assert len(public) == signing.PUBLIC_KEY_BYTES and len(sig) == signing.SIGNATURE_BYTES
    assert signing.public_bytes(key.public_key()) == public
    assert signing.verify(public, sig, msg)
    assert signing.verify(public, bytearray(sig), msg)


def test_wrong_key_message_or_flipped_bit_fails(key):
    msg = signing.statement("secagg/advert", 7, 3)
    sig = signing.sign(key, msg)
    public = signing.public_bytes(key)
    other = signing.public_bytes(signing.generate())
    assert not signing.verify(other, sig, msg)
    assert not signing.verify(public, sig, signing.statement("secagg/advert", 7, 4))
    for pos in (0, 31, 63):
        bad = bytearray(sig)
        bad[pos] ^= 1
        assert not signing.verify(public, bytes(bad), msg)


@pytest.mark.parametrize("public, sig, msg", [
    (b"short", b"\x00" * 64, b"m"),           # malformed key
    (b"\x00" * 32, b"\x00" * 63, b"m"),       # short signature
    (b"\x00" * 32, "not bytes", b"m"),        # wrong signature type
    (b"\x00" * 32, b"\x00" * 64, "a str"),    # wrong message type
    (None, b"\x00" * 64, b"m"),
])
def test_verify_never_raises(public, sig, msg):
    assert signing.verify(public, sig, msg) is False


def test_statements_are_domain_separated_and_unambiguous():
    s = signing.statement
    distinct = [
        s("a", b"xy"), s("a", b"x", b"y"), s("a", "xy"), s("b", b"xy"), s("a", b"xy", 0),
        s("a", 1), s("a", [1]), s("a", b"\x00" * 15 + b"\x01"), s("a", []), s("a", b""),
        s("a", [1, 2]), s("a", [2, 1]), s("a", 1, 2), s("a", [1], [2]), s("a", [1, 2], []),
    ]
    assert len(set(distinct)) == len(distinct)
    assert all(m.startswith(signing.STATEMENT_PREFIX) for m in distinct)
    # the same fields always encode alike (tuple, list, generator and range)
    assert s("a", [1, 2, 3]) == s("a", (1, 2, 3)) == s("a", (i for i in (1, 2, 3))) \
        == s("a", range(1, 4))
    assert signing.digest("a", 1) == hashlib.sha256(s("a", 1)).digest()


@pytest.mark.parametrize("bad", [-1, True, [1, -2], [True], 2**128, [2**128], 1.5, [1.0],
                                 {"a": 1}, None])
def test_bad_fields_raise_signature_error(bad):
    with pytest.raises(signing.SignatureError):
        signing.statement("d", bad)
    assert issubclass(signing.SignatureError, ValueError)


def test_largest_integer_field_is_accepted():
    assert signing.statement("d", 2**128 - 1) != signing.statement("d", 0)


def test_fingerprint_is_stable_and_openssh_like(key):
    public = signing.public_bytes(key)
    fp = signing.fingerprint(public)
    assert fp == signing.fingerprint(bytes(public))
    assert fp.startswith("SHA256:") and not fp.endswith("=") and len(fp) == 7 + 43
    assert fp != signing.fingerprint(signing.public_bytes(signing.generate()))
    with pytest.raises(signing.SignatureError):
        signing.fingerprint(public[:31])


def test_private_key_file_roundtrip_mode_and_no_overwrite(tmp_path, key):
    path = tmp_path / "me.key"
    signing.save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == signing.PRIVATE_KEY_MODE
    loaded = signing.load_private_key(path)
    assert signing.public_bytes(loaded) == signing.public_bytes(key)
    with pytest.raises(FileExistsError):
        signing.save_private_key(signing.generate(), path)
    assert signing.public_bytes(signing.load_private_key(path)) == signing.public_bytes(key)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_readable_by_others_is_refused(tmp_path, key, mode):
    path = tmp_path / "me.key"
    signing.save_private_key(key, path)
    os.chmod(path, mode)
    with pytest.raises(signing.SignatureError, match="readable by others"):
        signing.load_private_key(path)


def test_missing_garbage_and_non_ed25519_key_files(tmp_path):
    with pytest.raises(signing.SignatureError, match="cannot read"):
        signing.load_private_key(tmp_path / "absent.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    os.chmod(garbage, 0o600)
    with pytest.raises(signing.SignatureError, match="not an unencrypted PEM"):
        signing.load_private_key(garbage)
    ec = tmp_path / "ec.key"
    ec.write_bytes(generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(ec, 0o600)
    with pytest.raises(signing.SignatureError, match="not an Ed25519 key"):
        signing.load_private_key(ec)
