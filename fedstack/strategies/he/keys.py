"""CKKS key material: generation, the two context files, fingerprints, loading with clear errors.

Two kinds of context file:
- secret (for the data owners / clients): parameters, public key, secret key;
- public (for the server): parameters and public key only.
Neither holds Galois or relinearisation keys: averaging never multiplies or rotates, and
leaving them out keeps the server's file small and its capabilities minimal.

The fingerprint is SHA-256 over the parameters and the public key as stored. It names a key
pair: every ciphertext message carries it, so a reply made under another key (or against
another preset) is caught by comparing fingerprints before anything is added. It authenticates
nothing: anyone holding the public context can compute it.

File layout: MAGIC, u32 length of a JSON header, the JSON header (format, kind, preset,
parameters, fingerprint, section lengths), then the sections in header order. The JSON header
is readable with `head -c 600 FILE`, handy when a deployment mixes files up.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedstack.strategies.he.presets import CKKSPreset, get_preset
from fedstack.strategies.he.seal_io import Scratch, parse_header

CONTEXT_MAGIC = b"FEDSTACK-CKKS\x00"
CONTEXT_FORMAT = "fedstack-ckks-context"
CONTEXT_VERSION = 1
FINGERPRINT_DOMAIN = b"fedstack-ckks-fingerprint-v1\x00"
SECRET_CONTEXT_FILENAME = "he_secret.ckks"
PUBLIC_CONTEXT_FILENAME = "he_public.ckks"
# A context file is a few hundred KiB; refuse anything absurd before reading it into memory.
MAX_CONTEXT_FILE_BYTES = 64 * 1024 * 1024

Kind = Literal["public", "secret"]


class HEKeyError(ValueError):
    """A key/context file that is missing, malformed, of the wrong kind or of another key."""


def _sealapi() -> Any:
    import tenseal.sealapi as sealapi

    return sealapi


def compute_fingerprint(params_bytes: bytes, public_key_bytes: bytes) -> str:
    h = hashlib.sha256(FINGERPRINT_DOMAIN)
    for part in (params_bytes, public_key_bytes):
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    return h.hexdigest()


@dataclass
class PublicContext:
    """What the server holds: SEAL parameters and the public key. It cannot decrypt.

    `seal` is the SEALContext; `encryptor`/`decryptor` are deliberately absent here.
    """

    preset: CKKSPreset
    params_bytes: bytes
    public_key_bytes: bytes
    fingerprint: str
    seal: Any = field(repr=False)
    seal_version: tuple[int, int] = (0, 0)

    has_secret_key = False

    @property
    def slots(self) -> int:
        return self.preset.slots

    @property
    def data_primes(self) -> list[int]:
        """The primes a fresh ciphertext lives under (SEAL's first data level)."""
        cd = self.seal.first_context_data()
        return [m.value() for m in cd.parms().coeff_modulus()]

    @property
    def first_parms_id(self) -> list[int]:
        return list(self.seal.first_parms_id())

    def public_only(self) -> PublicContext:
        return self

    def to_public_bytes(self) -> bytes:
        """The public context file's content (never contains a secret key)."""
        return _encode_file(self, "public", [])


@dataclass
class SecretContext(PublicContext):
    """What a client holds: the public part plus the secret key (symmetric encryption)."""

    secret_key: Any = field(default=None, repr=False)
    secret_key_bytes: bytes = field(default=b"", repr=False)

    has_secret_key = True

    def public_only(self) -> PublicContext:
        """A public context for the same key, rebuilt from bytes (shares no secret object)."""
        return _public_from_parts(
            self.preset, self.params_bytes, self.public_key_bytes, self.fingerprint
        )

    def to_secret_bytes(self) -> bytes:
        return _encode_file(self, "secret", [("secret_key", self.secret_key_bytes)])


def _seal_context(preset: CKKSPreset, params: Any) -> Any:
    s = _sealapi()
    ctx = s.SEALContext(params, True, s.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise HEKeyError(
            f"SEAL rejects preset {preset.name!r}: {ctx.parameters_error_message()}"
        )
    return ctx


def _params_for(preset: CKKSPreset) -> Any:
    s = _sealapi()
    params = s.EncryptionParameters(s.SCHEME_TYPE.CKKS)
    params.set_poly_modulus_degree(preset.poly_modulus_degree)
    params.set_coeff_modulus(
        s.CoeffModulus.Create(preset.poly_modulus_degree, list(preset.coeff_modulus_bits))
    )
    return params


def generate_keys(preset: CKKSPreset) -> SecretContext:
    """A fresh key pair for `preset` (SEAL samples the secret key from the OS's CSPRNG)."""
    preset.check_security()
    s = _sealapi()
    params = _params_for(preset)
    ctx = _seal_context(preset, params)
    keygen = s.KeyGenerator(ctx)
    secret_key = keygen.secret_key()
    public_key = s.PublicKey()
    keygen.create_public_key(public_key)
    scratch = Scratch()
    try:
        params_bytes = scratch.save(params)
        public_key_bytes = scratch.save(public_key)
        secret_key_bytes = scratch.save(secret_key)
    finally:
        scratch.close()
    vmaj, vmin, _, _ = parse_header(params_bytes)
    return SecretContext(
        preset=preset,
        params_bytes=params_bytes,
        public_key_bytes=public_key_bytes,
        fingerprint=compute_fingerprint(params_bytes, public_key_bytes),
        seal=ctx,
        seal_version=(vmaj, vmin),
        secret_key=secret_key,
        secret_key_bytes=secret_key_bytes,
    )


def _encode_file(ctx: PublicContext, kind: Kind, extra: list[tuple[str, bytes]]) -> bytes:
    sections = [("params", ctx.params_bytes), ("public_key", ctx.public_key_bytes), *extra]
    header = {
        "format": CONTEXT_FORMAT,
        "version": CONTEXT_VERSION,
        "kind": kind,
        "preset": ctx.preset.name,
        "poly_modulus_degree": ctx.preset.poly_modulus_degree,
        "coeff_modulus_bits": list(ctx.preset.coeff_modulus_bits),
        "fingerprint": ctx.fingerprint,
        "sections": [[name, len(data)] for name, data in sections],
    }
    hb = json.dumps(header, indent=1).encode()
    return b"".join([CONTEXT_MAGIC, struct.pack("<I", len(hb)), hb, *(d for _, d in sections)])


def _public_from_parts(
    preset: CKKSPreset, params_bytes: bytes, public_key_bytes: bytes, fingerprint: str
) -> PublicContext:
    s = _sealapi()
    scratch = Scratch()
    try:
        params = scratch.load(s.EncryptionParameters(s.SCHEME_TYPE.CKKS), None, params_bytes)
        _check_params_match(preset, params)
        ctx = _seal_context(preset, params)
        # Load the public key to prove it belongs to these parameters (SEAL validates it).
        scratch.load(s.PublicKey(), ctx, public_key_bytes)
    finally:
        scratch.close()
    vmaj, vmin, _, _ = parse_header(params_bytes)
    return PublicContext(
        preset=preset,
        params_bytes=params_bytes,
        public_key_bytes=public_key_bytes,
        fingerprint=fingerprint,
        seal=ctx,
        seal_version=(vmaj, vmin),
    )


def _check_params_match(preset: CKKSPreset, params: Any) -> None:
    n = params.poly_modulus_degree()
    bits = [m.bit_count() for m in params.coeff_modulus()]
    if n != preset.poly_modulus_degree or tuple(bits) != preset.coeff_modulus_bits:
        raise HEKeyError(
            f"context parameters (N={n}, bits={bits}) do not match preset {preset.name!r} "
            f"(N={preset.poly_modulus_degree}, bits={list(preset.coeff_modulus_bits)})"
        )


def decode_context(data: bytes, *, expect: Kind, source: str = "<bytes>") -> PublicContext:
    """Parse a context file's bytes. `expect` is the kind the caller must get.

    A server (expect="public") handed a secret file is refused outright: the server must never
    hold the secret key, not even in memory.
    """
    if not data.startswith(CONTEXT_MAGIC):
        raise HEKeyError(
            f"{source} is not a fedstack CKKS context file (bad magic); "
            "create one with `fedstack keys --out DIR`"
        )
    off = len(CONTEXT_MAGIC)
    try:
        (hlen,) = struct.unpack_from("<I", data, off)
        header = json.loads(data[off + 4 : off + 4 + hlen])
    except (struct.error, ValueError) as exc:
        raise HEKeyError(f"{source}: unreadable context header ({exc})") from None
    if header.get("format") != CONTEXT_FORMAT or header.get("version") != CONTEXT_VERSION:
        raise HEKeyError(f"{source}: unsupported context format {header.get('format')!r}")
    kind = header.get("kind")
    if kind != expect:
        if expect == "public" and kind == "secret":
            raise HEKeyError(
                f"{source} is a SECRET context (it holds the secret key); the server must "
                f"be given the public context ({PUBLIC_CONTEXT_FILENAME})"
            )
        if expect == "secret" and kind == "public":
            raise HEKeyError(
                f"{source} is a PUBLIC context (no secret key): clients need the secret "
                f"context ({SECRET_CONTEXT_FILENAME}) to encrypt and decrypt"
            )
        raise HEKeyError(f"{source}: context kind {kind!r}, expected {expect!r}")
    names = [name for name, _ in header.get("sections", [])]
    wanted = ["params", "public_key"] + (["secret_key"] if kind == "secret" else [])
    if names != wanted:
        raise HEKeyError(f"{source}: sections {names}, expected {wanted}")
    pos = off + 4 + hlen
    parts: dict[str, bytes] = {}
    for name, size in header["sections"]:
        if not isinstance(size, int) or size < 0 or pos + size > len(data):
            raise HEKeyError(f"{source}: section {name!r} is truncated")
        parts[name] = data[pos : pos + size]
        pos += size
    if pos != len(data):
        raise HEKeyError(f"{source}: {len(data) - pos} unexpected trailing bytes")
    try:
        preset = get_preset(str(header.get("preset")))
    except ValueError as exc:
        raise HEKeyError(f"{source}: {exc}") from None
    fingerprint = compute_fingerprint(parts["params"], parts["public_key"])
    if fingerprint != header.get("fingerprint"):
        raise HEKeyError(f"{source}: fingerprint does not match its content (corrupted file)")
    try:
        public = _public_from_parts(preset, parts["params"], parts["public_key"], fingerprint)
    except HEKeyError:
        raise
    except Exception as exc:  # SEAL raises ValueError/RuntimeError on malformed data
        raise HEKeyError(f"{source}: SEAL rejects the stored keys ({exc})") from None
    if kind == "public":
        return public
    s = _sealapi()
    scratch = Scratch()
    try:
        secret_key = scratch.load(s.SecretKey(), public.seal, parts["secret_key"])
    except Exception as exc:
        raise HEKeyError(f"{source}: SEAL rejects the secret key ({exc})") from None
    finally:
        scratch.close()
    return SecretContext(
        preset=public.preset,
        params_bytes=public.params_bytes,
        public_key_bytes=public.public_key_bytes,
        fingerprint=public.fingerprint,
        seal=public.seal,
        seal_version=public.seal_version,
        secret_key=secret_key,
        secret_key_bytes=parts["secret_key"],
    )


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise HEKeyError(f"{what} {str(p)!r} does not exist (create keys with `fedstack keys`)")
    if p.stat().st_size > MAX_CONTEXT_FILE_BYTES:
        raise HEKeyError(f"{what} {str(p)!r} is too large to be a CKKS context")
    return p.read_bytes()


def load_public_context(path: str | os.PathLike[str]) -> PublicContext:
    """The server's loader: refuses a secret context."""
    return decode_context(_read(path, "public context"), expect="public", source=str(path))


def load_secret_context(path: str | os.PathLike[str]) -> SecretContext:
    """The clients' loader."""
    ctx = decode_context(_read(path, "secret context"), expect="secret", source=str(path))
    assert isinstance(ctx, SecretContext)
    return ctx


def write_contexts(ctx: SecretContext, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write (secret, public) context files into out_dir; the secret one is mode 0600.

    Refuses to overwrite existing files: replacing a key under a running federation would make
    every stored ciphertext unreadable.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secret_path = out / SECRET_CONTEXT_FILENAME
    public_path = out / PUBLIC_CONTEXT_FILENAME
    for p in (secret_path, public_path):
        if p.exists():
            raise HEKeyError(f"{str(p)!r} exists; refusing to overwrite a key")
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(ctx.to_secret_bytes())
    public_path.write_bytes(ctx.to_public_bytes())
    return secret_path, public_path
