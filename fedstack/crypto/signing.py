"""Ed25519 signatures over canonical, domain-separated statements.

Why: in malicious-secure aggregation a client must know that a public key, a graph
contribution or a survivor set really comes from a consortium member, not from the server
that routes every message. Each member holds a long-term Ed25519 key; every protocol
statement it makes is encoded canonically (a domain tag, then length-prefixed fields) and
signed, so a signature for one statement can never be replayed as another (different tag,
run, round or stage changes the bytes signed).

Nothing here imports Flower.
"""

from __future__ import annotations

import base64
import hashlib
import operator
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

PUBLIC_KEY_BYTES = 32
"""Size of a raw Ed25519 public key."""
SIGNATURE_BYTES = 64
"""Size of an Ed25519 signature."""
STATEMENT_PREFIX = b"fedstack/sig/v1"
"""Prefix of every signed statement: no fedstack signature verifies for another protocol."""
FINGERPRINT_PREFIX = "SHA256:"
"""Fingerprints look like OpenSSH's: ``SHA256:`` + unpadded base64 of SHA-256(public key)."""
PRIVATE_KEY_MODE = 0o600
"""A private key file readable by anyone but its owner is refused."""
INT_FIELD_BYTES = 16
"""Width of a statement integer (ids, rounds and counts all fit)."""
INT_FIELD_LIMIT = 1 << (8 * INT_FIELD_BYTES)

Field = bytes | str | int | Iterable[int]


class SignatureError(ValueError):
    """A key, signature or key file that cannot be used (never carries secret material)."""


def generate() -> Ed25519PrivateKey:
    """A fresh signing key from the OS CSPRNG (inside ``cryptography``)."""
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key of a private or public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes_raw()


def fingerprint(public: bytes) -> str:
    """A short, comparable name for a public key (what members read to each other)."""
    _check_public(public)
    digest = hashlib.sha256(public).digest()
    return FINGERPRINT_PREFIX + base64.b64encode(digest).decode().rstrip("=")


def _check_public(public: bytes) -> bytes:
    if not isinstance(public, bytes | bytearray) or len(public) != PUBLIC_KEY_BYTES:
        raise SignatureError(f"an Ed25519 public key must be {PUBLIC_KEY_BYTES} bytes")
    return bytes(public)


def _encode_field(value: Field) -> bytes:
    """Type tag + 8-byte length + payload: distinct values never encode alike."""
    if isinstance(value, bool):
        raise SignatureError("booleans are not statement fields; use 0/1")
    if isinstance(value, bytes | bytearray):
        tag, payload = b"b", bytes(value)
    elif isinstance(value, str):
        tag, payload = b"s", value.encode("utf-8")
    elif isinstance(value, int):
        tag, payload = b"i", _int_bytes(value)
    else:
        try:
            items = list(value)
            if any(isinstance(v, bool) for v in items):
                raise SignatureError("booleans are not statement fields; use 0/1")
            ints = [operator.index(v) for v in items]
        except TypeError:
            raise SignatureError(
                f"statement fields are bytes, str, int or a list of ints, not "
                f"{type(value).__name__}"
            ) from None
        tag, payload = b"l", b"".join(map(_int_bytes, ints))
    return tag + len(payload).to_bytes(8, "big") + payload


def _int_bytes(value: int) -> bytes:
    """A statement integer as 16 big-endian bytes (0 <= value < 2**128)."""
    if not 0 <= value < INT_FIELD_LIMIT:
        raise SignatureError("statement integers must be in [0, 2**128)")
    return value.to_bytes(INT_FIELD_BYTES, "big")


def statement(domain: str, *fields: Field) -> bytes:
    """The canonical bytes of a statement: prefix, domain tag, then each field.

    ``domain`` names the kind of statement (e.g. ``"secagg/advert"``); put the run id,
    round and stage among the fields so a signature binds them.
    """
    return b"".join([STATEMENT_PREFIX, _encode_field(domain), *map(_encode_field, fields)])


def digest(domain: str, *fields: Field) -> bytes:
    """SHA-256 of a statement: what to sign when the fields are long (e.g. id lists)."""
    return hashlib.sha256(statement(domain, *fields)).digest()


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``message``."""
    return key.sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True iff ``signature`` is ``public``'s valid signature of ``message``.

    Returns False (never raises) on a malformed key or signature, so that callers refuse
    with their own protocol-level reason.
    """
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_BYTES:
        return False
    if not isinstance(message, bytes | bytearray):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(_check_public(public)).verify(
            bytes(signature), bytes(message)
        )
    except (InvalidSignature, SignatureError, ValueError):
        return False
    return True


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the key as unencrypted PKCS#8 PEM, created with mode 0600 (never overwrites)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_KEY_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; refuse one that others may read or that is not Ed25519."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read the signing key {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise SignatureError(
            f"signing key {path} is readable by others (mode {mode:o}); chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key
