"""Deployment set-up tooling without Flower processes: certificates, node keys, commands."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedstack.deploy.certs import make_certificates, subject_alt_names
from fedstack.deploy.cli import certs_main, supernode_keys_main
from fedstack.deploy.local import (
    LocalDeployment,
    _parse_run_config,
    render_node_config,
    render_run_config,
)
from fedstack.deploy.node_keys import make_node_key, register_command


def _tls_handshake(certs: Path, server_hostname: str) -> str:
    """Serve one TLS handshake with server.pem/server.key; connect verifying against ca.crt."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            version = tls.version() or ""
            tls.sendall(b"x")
            return version
    finally:
        thread.join(timeout=5)
        listener.close()


def test_server_certificate_chains_to_the_ca_and_names_every_host(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, ["127.0.0.1", "superlink.example.org", "::1"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                      ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key() == server.public_key()
    for private in (paths.server_key, paths.ca_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_tls_handshake_succeeds_for_listed_names_only(tmp_path: Path) -> None:
    make_certificates(tmp_path, ["127.0.0.1", "localhost"])
    assert _tls_handshake(tmp_path, "127.0.0.1").startswith("TLS")
    assert _tls_handshake(tmp_path, "localhost").startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(tmp_path, "other.example.org")


def test_a_foreign_ca_does_not_verify_the_server(tmp_path: Path) -> None:
    make_certificates(tmp_path / "ours", ["127.0.0.1"])
    make_certificates(tmp_path / "theirs", ["127.0.0.1"])
    (tmp_path / "ours" / "ca.crt").write_bytes((tmp_path / "theirs" / "ca.crt").read_bytes())
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(tmp_path / "ours", "127.0.0.1")


def test_certificates_refuse_bad_hosts_and_overwriting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        subject_alt_names([" "])
    with pytest.raises(ValueError, match="neither"):
        subject_alt_names(["http://x"])
    make_certificates(tmp_path, ["127.0.0.1"])
    with pytest.raises(FileExistsError):
        make_certificates(tmp_path, ["127.0.0.1"])
    make_certificates(tmp_path, ["127.0.0.1"], overwrite=True)


def test_node_key_is_an_openssh_p384_pair_flower_accepts(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    key = make_node_key(tmp_path, "hospital-a")
    assert stat.S_IMODE(key.private_key.stat().st_mode) == 0o600
    text = key.private_key.read_text()
    assert text.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(text.encode(), password=None)
    public_line = key.public_key.read_text()
    assert public_line.startswith("ecdsa-sha2-nistp384 ") and public_line.rstrip().endswith(
        "hospital-a")
    public = serialization.load_ssh_public_key(public_line.encode())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key() == public
    # Flower's own loader (used by `flwr supernode register`) accepts it.
    assert len(try_load_public_key(key.public_key)) > 0
    other = make_node_key(tmp_path, "hospital-b")
    assert other.public_key.read_text() != public_line
    with pytest.raises(ValueError):
        make_node_key(tmp_path, "../escape")


def test_register_command_is_flowers_cli() -> None:
    cmd = register_command("flwr", Path("/k/sn1.pub"), "prod", "sn1")
    assert cmd[:5] == ["flwr", "supernode", "register", "/k/sn1.pub", "prod"]
    assert "--format" in cmd and "json" in cmd


def test_cli_commands_write_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs_main(["--out", str(tmp_path / "c"), "--host", "10.0.0.5,superlink"]) == 0
    out = capsys.readouterr().out
    assert "--ssl-certfile" in out and "server.pem" in out
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink"]
    assert certs_main(["--out", str(tmp_path / "c"), "--host", "x"]) == 2  # exists, no --force
    assert supernode_keys_main(["--out", str(tmp_path / "k"), "a", "b"]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["a", "a.pub", "b", "b.pub"]
    assert "flwr supernode register" in capsys.readouterr().out


def test_run_config_rendering_round_trips_through_flowers_parser() -> None:
    text = render_run_config({"task": "breast_cancer", "aggregation": "secagg"},
                             ["num_rounds=2", "output_dir=/tmp/a b", "resume=/x/y"])
    parsed = _parse_run_config(text)
    assert parsed["task"] == "breast_cancer" and parsed["aggregation"] == "secagg"
    import shlex

    assert shlex.split(parsed["overrides"]) == ["num_rounds=2", "output_dir=/tmp/a b",
                                                "resume=/x/y"]
    node = render_node_config({"partition-id": 1, "num-partitions": 3,
                               "he-secret-context": "/keys/he secret.ckks"})
    assert _parse_run_config(node) == {"partition-id": 1, "num-partitions": 3,
                                       "he-secret-context": "/keys/he secret.ckks"}


def test_harness_commands_use_tls_auth_and_loopback(tmp_path: Path) -> None:
    """The exact flags each process gets (no process is started here)."""
    dep = LocalDeployment(tmp_path, num_supernodes=2)
    try:
        link = dep.superlink_command()
        assert link[link.index("--host") + 1] == "127.0.0.1"
        for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation",
                     "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database"):
            assert flag in link
        assert "--insecure" not in link
        assert dep.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        assert dep.env["FLWR_HOME"] == str(tmp_path / "flwr-home")
        config = dep.write_connection().read_text()
        assert f'address = "127.0.0.1:{dep.superlink_port}"' in config
        assert f'root-certificates = "{tmp_path / "certs" / "ca.crt"}"' in config
        assert "insecure" not in config
    finally:
        dep.close()


def test_fault_injection_spoils_only_the_payload(tmp_path: Path) -> None:
    """The test ClientApp's tampering: NaN / wrong shape / random payload bytes."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Context, RecordDict

    from fedstack.deploy.fault_injection import _tamper_record, fault_app_dir, fault_kind

    record = ArrayRecord({"meta": Array(np.frombuffer(b'{"n": 1}', dtype=np.uint8).copy()),
                          "blob": Array(np.zeros(4096, dtype=np.uint8))})
    spoiled = _tamper_record(record, "garbage")
    assert bytes(spoiled["meta"].numpy()) == b'{"n": 1}'
    assert spoiled["blob"].numpy().shape == (4096,) and spoiled["blob"].numpy().any()
    weights = ArrayRecord({"w": Array(np.ones((3, 4), np.float32)),
                           "b": Array(np.ones(3, np.float32))})
    assert np.isnan(_tamper_record(weights, "nan")["w"].numpy()).all()
    assert _tamper_record(weights, "shape")["w"].numpy().shape == (11,)
    assert _tamper_record(weights, "shape")["b"].numpy().shape == (3,)

    fault_file = tmp_path / "fault"
    fault_file.write_text("nan\n")
    ctx = Context(run_id=1, node_id=5, node_config={"fedstack-fault-file": str(fault_file)},
                  state=RecordDict(), run_config={})
    assert fault_kind(ctx) == "nan"
    fault_file.write_text("bogus")
    with pytest.raises(ValueError, match="fedstack-fault"):
        fault_kind(ctx)
    app = fault_app_dir(Path(__file__).resolve().parent.parent, tmp_path / "app")
    text = (app / "pyproject.toml").read_text()
    assert 'clientapp = "fedstack.deploy.fault_injection:app"' in text
    assert 'serverapp = "fedstack.server_app:app"' in text
