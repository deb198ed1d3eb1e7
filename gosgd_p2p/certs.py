"""gosgd-certs: a demo cluster CA, node certificates for mutual TLS, and a cluster token.

    gosgd-certs --out certs --nodes n0,n1,n2

writes certs/ca.pem, ca.key, n0.pem, n0.key, ... and certs/token. Keys are EC P-256, written
with mode 0600. Every node certificate carries the DNS names security.TLS_TARGET_NAME (what
clients verify, whatever address they dial) and the node's own name, and may act as server and
as client. Running it again on the same folder reuses the CA and the token, so nodes can be
added later; --new-ca starts over. For a real deployment, use your own PKI: gosgd-node needs
only a CA certificate and, per node, a certificate with those two properties and its key.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gosgd_p2p.security import TLS_TARGET_NAME

__all__ = [
    "CA_DAYS",
    "cert_pem",
    "key_pem",
    "main",
    "make_ca",
    "make_node_cert",
    "write_cluster",
]

#: Lifetime of a new CA, days (longer than the node certificates it signs).
CA_DAYS = 3650
#: Node certificates become valid this long before "now", for clocks that lag a little.
CLOCK_SKEW = datetime.timedelta(minutes=5)
#: A node name: one DNS label (it becomes a SAN and a file name).
NODE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: Names of files this tool writes besides node files; no node may be called so.
RESERVED = frozenset({"ca", "token"})


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(
    common_name: str = "gosgd cluster CA", days: int = CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA certificate valid for `days` days, and its P-256 key.

    The certificate may sign certificates (BasicConstraints ca=True, path length 0, KeyUsage
    keyCertSign) but not serve or authenticate itself.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_node_cert(
    name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int = 365,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for node `name` signed by the CA, valid for `days` days, and its P-256 key.

    SubjectAlternativeName: DNS TLS_TARGET_NAME and DNS `name`; ExtendedKeyUsage serverAuth and
    clientAuth (a node is both). ValueError with one line if `name` is not a DNS label or the
    certificate would outlive the CA.
    """
    if not NODE_NAME.fullmatch(name):
        raise ValueError(
            f"node name {name!r} must be letters, digits and inner '-' (a DNS label, <= 63)"
        )
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    now = _now()
    not_after = now + datetime.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        raise ValueError(
            f"the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before a {days}-day "
            "certificate would: use fewer --days or --new-ca"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    names = dict.fromkeys([TLS_TARGET_NAME, name])  # ordered, without a repeat
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM, the form gRPC and --tls-cert / --tls-ca take."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM, the form gRPC and --tls-key take."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool) -> None:
    """Replace `path` with `data` at once; a private file is 0600 from its first byte."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)  # umask and an old tmp file aside
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA already in `out`, or None when there is none; ValueError if it is unusable."""
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    if not cert_path.exists() and not key_path.exists():
        return None
    if not (cert_path.exists() and key_path.exists()):
        raise ValueError(f"{out} holds only one of ca.pem and ca.key: restore it or use --new-ca")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot load the CA in {out} ({err}): use --new-ca") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError(f"{out}/ca.key is not the key of {out}/ca.pem: use --new-ca")
    return cert, key


def write_cluster(
    out: Path, nodes: Sequence[str], days: int = 365, new_ca: bool = False
) -> list[Path]:
    """Write the CA, a certificate and key per node, and the token into `out`.

    Reuses the CA (ca.pem, ca.key) and the token already in `out` unless `new_ca`, so nodes
    can be added later. Returns the paths written, in order. ValueError with one line for a
    bad name or days, an unusable CA or an unwritable folder; all but the last are found before
    anything is written.
    """
    if not nodes:
        raise ValueError("no node names given")
    for name in nodes:
        if name.lower() in RESERVED:
            raise ValueError(f"node name {name!r} is reserved (the CA and token files use it)")
    if len({n.lower() for n in nodes}) != len(nodes):
        raise ValueError("node names repeat (case-insensitively)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    ca = None if new_ca else _load_ca(out)
    written: list[Path] = []
    files: list[tuple[Path, bytes, bool]] = []
    if ca is None:
        ca = make_ca(days=max(days, CA_DAYS))
        files += [(out / "ca.pem", cert_pem(ca[0]), False), (out / "ca.key", key_pem(ca[1]), True)]
    for name in nodes:
        cert, key = make_node_cert(name, ca[0], ca[1], days)
        files += [
            (out / f"{name}.pem", cert_pem(cert), False),
            (out / f"{name}.key", key_pem(key), True),
        ]
    token = out / "token"
    if new_ca or not token.exists():
        files.append((token, secrets.token_hex(32).encode() + b"\n", True))
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, data, private in files:
            _write(path, data, private)
            written.append(path)
    except OSError as err:
        raise ValueError(f"cannot write to {out}: {err.strerror}") from None
    return written


class _OneLineParser(argparse.ArgumentParser):
    """Errors as one line naming the fix, without the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """The gosgd-certs command; returns the exit status (0, or 2 for bad input)."""
    parser = _OneLineParser(
        prog="gosgd-certs",
        description="Write a demo cluster CA, a certificate and key per node for mutual TLS, "
        "and a cluster token, for gosgd-node --tls-cert/--tls-key/--tls-ca/--token-file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder to write into (created if needed)")
    parser.add_argument("--nodes", required=True, help="node names, comma-separated: n0,n1,n2")
    parser.add_argument("--days", type=int, default=365, help="validity of node certificates")
    parser.add_argument(
        "--new-ca", action="store_true", help="replace the CA and token already in --out"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    try:
        written = write_cluster(out, nodes, args.days, args.new_ca)
    except ValueError as err:
        parser.error(str(err))
    for path in written:
        print(f"wrote {path}")
    if out / "ca.pem" not in written:
        print(f"reused the CA in {out / 'ca.pem'}")
    if out / "token" not in written:
        print(f"reused the token in {out / 'token'}")
    print("start each node with (NAME one of the names above; copy only its own key):")
    print(
        f"  gosgd-node --node-id NAME --tls-cert {out}/NAME.pem --tls-key {out}/NAME.key "
        f"--tls-ca {out}/ca.pem --token-file {out}/token"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
