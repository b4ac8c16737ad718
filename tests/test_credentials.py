"""Deployment credentials (server.credentials, `tmepsr credentials`): a TLS chain that verifies for the named
hosts, node keys in the formats flwr 1.42's own loaders accept, private keys 0600, nothing overwritten."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message, verify_signature
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from server.credentials import TlsFiles, add_node_keys, generate_credentials
from simulations.cli import main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _handshake(tls: TlsFiles, server_hostname: str, ca: Path | None) -> str:
    """A TLS handshake on 127.0.0.1 with the SuperLink's certificate, verified for ``server_hostname``
    (strict X.509 checks, as Python 3.13 makes default); returns the negotiated version."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    client_ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):  # a refused handshake is the client's error to report
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.recv(1)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as conn:
                    return str(conn.version())
        finally:
            thread.join(timeout=5)


def test_tls_chain_verifies_for_named_hosts_only(tmp_path):
    old = os.umask(0o077)  # the public files must still be readable by others
    try:
        tls, nodes = generate_credentials(tmp_path / "c", ["pilot.example.org", "10.1.2.3"], ["a", "b"])
    finally:
        os.umask(old)
    for path in (tls.ca_key, tls.server_key, *(n.private_key for n in nodes)):
        assert _mode(path) == 0o600, path
    for path in (tls.ca_cert, tls.server_cert, *(n.public_key for n in nodes)):
        assert _mode(path) == 0o644, path
    assert sorted(p.name for p in (tmp_path / "c" / "nodes").iterdir()) == [
        "a.key",
        "a.pub",
        "b.key",
        "b.pub",
    ]
    for host in ("pilot.example.org", "10.1.2.3", "localhost", "127.0.0.1"):
        assert _handshake(tls, host, tls.ca_cert).startswith("TLS"), host
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(tls, "other.example.org", tls.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(tls, "localhost", None)  # the system trust store does not know the private CA
    other, _ = generate_credentials(tmp_path / "other", [], [])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls, "localhost", other.ca_cert)  # another deployment's CA


def test_node_keys_load_with_flowers_own_code(tmp_path):
    """The SuperLink finds a node by the PEM of the public key: what `flwr supernode register` stores from
    the .pub file must equal what `flower-supernode` derives from the private key, and signatures verify."""
    (node,) = add_node_keys(tmp_path, ["phone-1"])
    registered = try_load_public_key(node.public_key)
    args = argparse.Namespace(
        auth_supernode_private_key=str(node.private_key), auth_supernode_public_key=None
    )
    private, public = _try_setup_client_authentication(args)
    assert public_key_to_bytes(public) == registered
    assert private.curve.name == "secp384r1"
    signature = sign_message(private, b"2026-01-01T00:00:00+00:00")
    assert verify_signature(public, b"2026-01-01T00:00:00+00:00", signature)
    assert node.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_refuses_to_overwrite_and_bad_input(tmp_path):
    out = tmp_path / "c"
    tls, _ = generate_credentials(out, [], ["a"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_credentials(out, [], ["b"])
    with pytest.raises(FileExistsError, match="a.key"):
        add_node_keys(out, ["c", "a"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written at all
    with pytest.raises(ValueError, match="neither an IP address nor a DNS name"):
        generate_credentials(tmp_path / "d", ["pilot.example.org:9093"])
    with pytest.raises(ValueError, match="invalid node names"):
        add_node_keys(tmp_path / "d", ["../escape"])
    with pytest.raises(ValueError, match="duplicate"):
        add_node_keys(tmp_path / "d", ["x", "x"])
    with pytest.raises(ValueError, match="days"):
        generate_credentials(tmp_path / "d", days=0)
    assert not (tmp_path / "d").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "creds"
    assert (
        main(["credentials", "init", "--out", str(out), "--host", "pilot.example.org", "--nodes", "2"]) == 0
    )
    text = capsys.readouterr().out
    assert "--enable-supernode-auth" in text and f"flwr supernode register {out}/nodes/node-1.pub" in text
    assert main(["credentials", "add-node", "--dir", str(out), "tablet"]) == 0
    assert f"--auth-supernode-private-key {out}/nodes/tablet.key" in capsys.readouterr().out
    assert main(["credentials", "init", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
