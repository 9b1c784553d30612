"""TLS termination: certificates, SNI, and reloading them without a restart.

Each certificate/key pair becomes a Twisted ``CertificateOptions``: TLS 1.2 at
least (1.3 preferred, as OpenSSL negotiates the highest), Twisted's modern
cipher list with server preference, no compression, no renegotiation, ALPN
offering only ``http/1.1``, and server-side session resumption (session cache
and tickets). ``ssl.sni`` adds pairs per host name, wildcards included; the
default pair answers any other name.

``ServerTLS`` is the connection creator the TLS listener uses. SIGHUP builds
new options from the files and swaps them in: new connections get the new
certificates, established ones keep theirs, and a pair that does not load is
reported while the old one stays.
"""

import datetime
from typing import Any, Dict, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from ntonix.config import Config, ConfigError

log = Logger(namespace="ntonix.tls")


def _line(setting: str, value: str, source: str, why: str) -> str:
    return f'{setting} = "{value}" ({source}): {why}'


def _read(path: str, setting: str, source: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise ConfigError([_line(setting, path, source,
                                 f"cannot be read: {e.strerror or e}")]) from None


def load_pair(cert_file: str, key_file: str, where: Tuple[str, str, str, str],
              now: Optional[datetime.datetime] = None
              ) -> Tuple[crypto.X509, crypto.PKey, List[crypto.X509]]:
    """Read and check one certificate/key pair.

    ``where`` names the settings and their sources for the error line:
    (cert setting, cert source, key setting, key source).
    """
    cert_setting, cert_src, key_setting, key_src = where
    cert_pem = _read(cert_file, cert_setting, cert_src)
    key_pem = _read(key_file, key_setting, key_src)
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError([_line(cert_setting, cert_file, cert_src,
                                 "not a PEM certificate")]) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError([_line(key_setting, key_file, key_src,
                                 "not an unencrypted PEM private key")]) from None
    leaf = certs[0]
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        raise ConfigError([_line(cert_setting, cert_file, cert_src,
                                 f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")])
    if leaf.not_valid_before_utc > now:
        raise ConfigError([_line(cert_setting, cert_file, cert_src,
                                 f"certificate not valid before "
                                 f"{leaf.not_valid_before_utc:%Y-%m-%d}")])
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, pub) != key.public_key().public_bytes(der, pub):
        raise ConfigError([_line(key_setting, key_file, key_src,
                                 f"does not match the certificate in {cert_file}")])
    return (crypto.X509.from_cryptography(leaf), crypto.PKey.from_cryptography_key(key),
            [crypto.X509.from_cryptography(c) for c in certs[1:]])


def _options(pair: Tuple[crypto.X509, crypto.PKey, List[crypto.X509]],
             for_name: Any = None) -> CertificateOptions:
    cert, key, chain = pair
    opts = CertificateOptions(
        privateKey=key, certificate=cert, extraCertChain=chain,
        raiseMinimumTo=TLSVersion.TLSv1_2, acceptableProtocols=[b"http/1.1"],
        enableSessionTickets=True, contextForServerName=for_name,
    )
    ctx = opts.getContext()
    ctx.set_options(SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    return opts


def matches(pattern: str, name: str) -> bool:
    """Host name matching with one leading wildcard label, as in certificates."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def build_options(config: Config) -> CertificateOptions:
    """The default pair plus the SNI pairs, or ConfigError naming the problem."""
    ssl = config.ssl
    where = ("ssl.cert_file", config.source_of("ssl.cert_file"),
             "ssl.key_file", config.source_of("ssl.key_file"))
    default = load_pair(ssl.cert_file, ssl.key_file, where)
    by_name: Dict[str, CertificateOptions] = {}
    errors: List[str] = []
    sni_src = config.source_of("ssl.sni")
    for host, pair in ssl.sni.items():
        try:
            by_name[host] = _options(load_pair(
                pair["cert_file"], pair["key_file"],
                (f"ssl.sni.{host}.cert_file", sni_src, f"ssl.sni.{host}.key_file", sni_src)))
        except ConfigError as e:
            errors.extend(e.lines)
    if errors:
        raise ConfigError(errors)
    exact = {h.lower(): o for h, o in by_name.items() if not h.startswith("*.")}
    wild = [(h, o) for h, o in by_name.items() if h.startswith("*.")]

    def for_name(server_name: Optional[bytes]) -> Optional[SSL.Context]:
        if not server_name:
            return None
        # SNI carries A-labels (ASCII); anything else matches nothing.
        name = server_name.decode("ascii", "replace").lower()
        opts = exact.get(name) or next((o for h, o in wild if matches(h, name)), None)
        return opts.getContext() if opts is not None else None

    return _options(default, for_name if by_name else None)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Makes the server side of each TLS connection from the options in force."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.options = build_options(config)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.options.getContext(), None)

    def reload(self, config: Optional[Config] = None) -> bool:
        """Load the certificate files again (SIGHUP)."""
        config = config or self.config
        try:
            options = build_options(config)
        except ConfigError as e:
            for line in e.lines:
                log.error("certificate reload refused, keeping the old ones: {problem}",
                          problem=line)
            return False
        self.config, self.options = config, options
        log.info("certificates reloaded from {cert}", cert=config.ssl.cert_file)
        return True


def tls_wanted(config: Config) -> bool:
    """HTTPS when ssl.enabled, or when a certificate and key were given."""
    return config.ssl.enabled or bool(config.ssl.cert_file and config.ssl.key_file)
