"""SuperNode authentication keys: ECDSA P-384 in OpenSSH format, like `ssh-keygen -t ecdsa -b 384`.

With `flower-superlink --enable-supernode-auth` a SuperNode is admitted only if its public key
was registered beforehand (`flwr supernode register KEY.pub CONNECTION`) and it proves
possession of the private key (`flower-supernode --auth-supernode-private-key KEY`).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: Flower accepts NIST curves; P-384 is what its documentation generates.
NODE_KEY_CURVE = ec.SECP384R1
PRIVATE_KEY_MODE = 0o600
#: A SuperNode key name becomes a file name.
NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair on disk."""

    name: str
    private_key: Path
    public_key: Path


def make_node_key(out_dir: Path, name: str, *, overwrite: bool = False) -> NodeKey:
    """Write `<name>` (OpenSSH private key) and `<name>.pub` (OpenSSH public key line)."""
    if not NODE_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"node key name {name!r}: use letters, digits and . _ - only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / name, out_dir / f"{name}.pub"
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise FileExistsError(f"{private_path} exists (pass --force to replace it)")
    key = ec.generate_private_key(NODE_KEY_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_KEY_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    os.chmod(private_path, PRIVATE_KEY_MODE)
    public_path.write_bytes(public + f" {name}\n".encode())
    return NodeKey(name, private_path, public_path)


def register_command(flwr: str, public_key: Path, connection: str, name: str | None = None
                     ) -> list[str]:
    """The `flwr supernode register` command line for one public key."""
    command = [flwr, "supernode", "register", str(public_key), connection, "--format", "json"]
    if name:
        command += ["--name", name]
    return command


def register_node_key(flwr: str, public_key: Path, connection: str, env: dict[str, str],
                      name: str | None = None, timeout: float = 60.0) -> int:
    """Register a SuperNode public key with the SuperLink of `connection`; returns its node id.

    The node id is what the SuperLink will call that SuperNode; registering also fixes which
    key may ever connect as it.
    """
    proc = subprocess.run(register_command(flwr, public_key, connection, name), env=env,
                          capture_output=True, text=True, timeout=timeout)
    match = re.search(r'"node-id"\s*:\s*(\d+)', proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"`flwr supernode register {public_key.name}` failed "
                           f"(exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}")
    return int(match.group(1))
