"""The per-sandbox certificate authority the proxy intercepts HTTPS with.

    ca = CertificateAuthority.create(fence_dir)      # once, when the sandbox is fenced
    ca = CertificateAuthority.load(fence_dir)        # in the proxy daemon
    ctx = ca.server_context("api.example.com")       # an ssl.SSLContext for that name
    bundle = ca.trust_bundle()                       # the host's bundle + this CA (PEM)

The CA's private key lives in the fence directory on the host (mode 0600) and
never enters the sandbox; the sandbox gets only the certificate, inside its
system bundle. Leaf certificates are minted on demand, all with one EC P-256
key per CA (signing is the only per-host work), and their TLS contexts are
cached, so a new host costs well under a millisecond after the first.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from corral.errors import SandboxError

__all__ = ["CA_CERT", "CA_KEY", "CertificateAuthority", "host_bundle"]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
#: where Debian-like systems keep the bundle every TLS library reads by default
HOST_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem")
_LEAF_DAYS = 30
_CACHE = 1024


def host_bundle() -> bytes:
    """The host's system CA bundle (empty when the host has none)."""
    for path in HOST_BUNDLES:
        try:
            return Path(path).read_bytes()
        except OSError:
            continue
    return b""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateAuthority:
    """One sandbox's CA: its certificate, its key, and the leaf contexts it minted."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 directory: Path) -> None:
        self.cert = cert
        self._key = key
        self.directory = directory
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    # -- making and loading --------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, name: str = "corral sandbox CA") -> CertificateAuthority:
        """Make a new CA in ``directory`` (ca.pem, and ca.key with mode 0600)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "corral")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        key_path = directory / CA_KEY
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        (directory / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key, directory)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Load the CA kept in ``directory``. Raises ``SandboxError`` if it is missing."""
        try:
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise SandboxError(f"the fence CA in {directory} cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SandboxError(f"the fence CA key in {directory} is not an EC key")
        return cls(cert, key, directory)

    # -- what the sandbox trusts ---------------------------------------------------
    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def trust_bundle(self) -> bytes:
        """The host's CA bundle with this CA appended: the sandbox's system bundle."""
        base = host_bundle()
        if base and not base.endswith(b"\n"):
            base += b"\n"
        return base + self.cert_pem

    # -- leaves ----------------------------------------------------------------------
    def server_context(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a certificate for ``host`` (a name or an
        IP literal), offering only HTTP/1.1 through ALPN. Cached; thread safe."""
        with self._lock:
            ctx = self._contexts.get(host)
            if ctx is not None:
                self._contexts.move_to_end(host)
                return ctx
        ctx = self._mint(host)
        with self._lock:
            self._contexts[host] = ctx
            while len(self._contexts) > _CACHE:
                self._contexts.popitem(last=False)
        return ctx

    def _on_sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None,
                ctx: ssl.SSLContext) -> None:
        """Remember the client's SNI (the proxy checks it against the destination) and
        present a certificate for that name, so a mismatch ends in a readable 403."""
        if not name:
            return
        try:
            sslobj.corral_sni = name  # type: ignore[union-attr]
        except AttributeError:
            return
        host = name.lower().rstrip(".")
        if 0 < len(host) <= 253 and all(c.isalnum() or c in "-._" for c in host):
            sslobj.context = self.server_context(host)

    def leaf_pem(self, host: str) -> bytes:
        """The PEM certificate for ``host`` followed by the CA's (tests, diagnostics)."""
        return self._leaf_cert(host).public_bytes(serialization.Encoding.PEM) + self.cert_pem

    def _leaf_cert(self, host: str) -> x509.Certificate:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        now = _now()
        cn = host if len(host) <= 64 else host[:64]
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def _mint(self, host: str) -> ssl.SSLContext:
        pem = self._leaf_key_pem + self.leaf_pem(host)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = self._on_sni
        # ssl loads key material only from files: a private temporary file, gone at once
        fd, tmp = tempfile.mkstemp(prefix="leaf-", suffix=".pem", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            ctx.load_cert_chain(tmp)
        finally:
            os.unlink(tmp)
        return ctx
