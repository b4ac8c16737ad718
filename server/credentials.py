"""Deployment credentials for Flower 1.42: a private CA, the SuperLink's TLS certificate, SuperNode auth keys.

How flwr 1.42 uses them (read in its source, ``flwr/``):

- TLS. ``flower-superlink`` serves the Fleet, Control and Runtime APIs on ONE HTTPS port (uvicorn,
  ``superlink.cli.flower_superlink._run_superlink_http_api`` passes ``ssl_certfile``/``ssl_keyfile``); the three
  flags ``--ssl-ca-certfile --ssl-certfile --ssl-keyfile`` are all required (``common.args.
  try_obtain_server_certificates``). The CA file is handed to the SuperLink's own ``flower-superexec``
  (``superlink.cli.flower_superlink._get_superexec_command`` -> ``supercore.tls.get_client_tls_args``), which
  connects to ``--host`` with bind-all hosts mapped to 127.0.0.1/::1 (``supercore.address.resolve_bind_address``):
  the server certificate therefore always names 127.0.0.1, ::1 and localhost besides the public hosts.
  Clients verify the server with a PEM CA file: ``flower-supernode --root-certificates`` (``common.args.
  try_obtain_root_certificates``; without it the system trust store is used) and, for the ``flwr`` CLI, the
  absolute path in ``root-certificates`` of ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``
  (``cli.typing.SuperLinkConnection``, ``cli.config_utils.load_certificate_in_connection``). Verification is
  httpx/ssl with hostname checking (``supercore.protobuf.client.ProtobufClient.from_server_address``).
- SuperNode authentication. Every Fleet request carries a public key and an ECDSA-SHA256 signature over a
  timestamp (``supernode.node_auth_http_interceptor``), checked by ``superlink.routers.fleet.node_auth.
  authenticate_node``. A SuperNode without ``--auth-supernode-private-key`` makes an ephemeral key pair and
  registers itself (``supernode.fleet_http_connection.http_request_response``). With
  ``flower-superlink --enable-supernode-auth`` (requires TLS: ``_parse_superlink_lifespan_config``)
  self-registration is refused (``superlink.servicer.fleet.fleet_handlers.register_node``:
  FLEET_SUPERNODE_REGISTRATION_DISABLED) and a node may only activate a public key the operator registered
  through the Control API, ``flwr supernode register KEY.pub CONNECTION`` (``cli.supernode.register``;
  ``superlink.servicer.control.control_handlers.register_node``); an unknown key fails
  ``fleet_handlers.activate_node`` (FLEET_NODE_ACTIVATION_FAILED, HTTP 412), which the node treats as final
  and exits with ExitCode.SUPERNODE_CONNECTION_ERROR (305). ``flwr supernode ls/unregister`` list and revoke.
- Key formats. The node's private key is an unencrypted OpenSSH private key holding a NIST EC key
  (``supernode.cli.flower_supernode._try_setup_client_authentication``: ``load_ssh_private_key(data, None)``);
  the file given to ``flwr supernode register`` is the OpenSSH public key of a NIST curve
  (``cli.supernode.register.try_load_public_key``). Flower's own keys are P-384
  (``supercore.primitives.asymmetric.generate_key_pairs``); so are these.

Layout written by ``generate_credentials`` (private keys 0600, nothing is ever overwritten)::

    ca.crt           the CA certificate: every SuperNode and operator verifies the SuperLink with it
    ca.key           the CA's private key: keep it offline; only needed to issue a new server certificate
    server.crt       the SuperLink certificate (SANs: the given hosts, localhost, 127.0.0.1, ::1)
    server.key       its private key
    nodes/NAME.key   a SuperNode's private key (--auth-supernode-private-key; stays on that device)
    nodes/NAME.pub   its public key (flwr supernode register nodes/NAME.pub CONNECTION)
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODES_DIR = "nodes"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1
CLOCK_SKEW = timedelta(minutes=5)  # certificates are valid from a little before "now"
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class NodeKeys:
    """One SuperNode's authentication key pair (OpenSSH files)."""

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class TlsFiles:
    """The CA and the SuperLink's certificate and key."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def superlink_args(tls: TlsFiles, *, node_auth: bool = True) -> list[str]:
    """``flower-superlink`` flags for TLS (and SuperNode authentication unless ``node_auth`` is False)."""
    args = ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert)]
    args += ["--ssl-keyfile", str(tls.server_key)]
    return args + ["--enable-supernode-auth"] if node_auth else args


def supernode_args(ca_cert: Path, node: NodeKeys | None = None) -> list[str]:
    """``flower-supernode`` flags: verify the SuperLink with ``ca_cert``; authenticate as ``node``."""
    args = ["--root-certificates", str(ca_cert)]
    return args + ["--auth-supernode-private-key", str(node.private_key)] if node else args


def generate_credentials(
    out_dir: str | Path, hosts: Sequence[str] = (), nodes: Sequence[str] = (), *, days: int = 365
) -> tuple[TlsFiles, list[NodeKeys]]:
    """Write a new CA, a SuperLink certificate for ``hosts`` (plus loopback) and one key pair per node name
    into ``out_dir``. Refuses (FileExistsError, before writing anything) when any of the files exists."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    sans = _subject_alt_names([*hosts, *LOOPBACK_HOSTS])
    out = Path(out_dir)
    tls = TlsFiles(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    names = _check_node_names(nodes)
    _refuse_existing([tls.ca_cert, tls.ca_key, tls.server_cert, tls.server_key, *_node_paths(out, names)])

    ca_key, server_key = ec.generate_private_key(CURVE()), ec.generate_private_key(CURVE())
    start = datetime.now(UTC) - CLOCK_SKEW
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tme-psr deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), start, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    # Clients check the host against the SANs, never the common name.
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tme-psr SuperLink")])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key(), start, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_new(tls.ca_key, _private_pem(ca_key), 0o600)
    _write_new(tls.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(tls.server_key, _private_pem(server_key), 0o600)
    _write_new(tls.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return tls, _write_node_keys(out, names)


def add_node_keys(out_dir: str | Path, nodes: Sequence[str]) -> list[NodeKeys]:
    """Write one new SuperNode key pair per name into ``out_dir/nodes`` (refusing existing names)."""
    names = _check_node_names(nodes)
    if not names:
        raise ValueError("no node names given")
    _refuse_existing(_node_paths(Path(out_dir), names))
    return _write_node_keys(Path(out_dir), names)


def _write_node_keys(out: Path, names: list[str]) -> list[NodeKeys]:
    if names:
        (out / NODES_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for name in names:
        key = ec.generate_private_key(CURVE())
        private_path, public_path = _node_paths(out, [name])
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write_new(private_path, private, 0o600)
        _write_new(public_path, public + f" tmepsr-node-{name}\n".encode(), 0o644)
        written.append(NodeKeys(name, private_path, public_path))
    return written


def _node_paths(out: Path, names: Sequence[str]) -> list[Path]:
    return [out / NODES_DIR / f"{name}{ext}" for name in names for ext in (".key", ".pub")]


def _check_node_names(nodes: Sequence[str]) -> list[str]:
    names = [str(n) for n in nodes]
    bad = [n for n in names if not _NODE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"invalid node names {bad}: use 1-64 letters, digits, '_', '.', '-' (not first)")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate node names in {names}")
    return names


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses and DNS names (lower-cased), each once, in the given order."""
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(str(h).strip().lower() for h in hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            labels = host.rstrip(".").split(".")
            if ":" in host or len(host) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in labels):
                raise ValueError(
                    f"{host!r} is neither an IP address nor a DNS name (give the host without a port)"
                ) from None
            sans.append(x509.DNSName(host.rstrip(".")))
    return sans


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey, start: datetime, days: int
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CLOCK_SKEW + timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM: uvicorn loads ``--ssl-keyfile`` without a password."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise FileExistsError(f"refusing to overwrite existing credential files: {', '.join(existing)}")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively (never replacing a file, even one that appeared meanwhile) with ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, mode)  # exactly ``mode``: the umask may have removed bits (a 077 umask hides .pub/.crt)
        out.write(data)
