"""TLS (optionally mTLS) for the gRPC port, with certificates re-read when their files change.

gRPC asks ``ServerCertificates.fetch`` for the certificate configuration at every new
connection's handshake; it answers "unchanged" after one ``stat`` per file unless a file's
identity (inode, size, modification time) moved, so rotation needs no restart and no polling:
Kubernetes swaps a mounted Secret's files atomically, and the next connection gets the new
certificate while open connections keep theirs. A changed set that does not load (a key that
does not match its certificate, a file caught mid-write) is logged and counted, and the last
good configuration stays in use.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from extproc.config import ConfigError, ServerSettings
from extproc.telemetry import Telemetry

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int, int], ...]


class CertificateError(Exception):
    """A file set that cannot be served; ``key`` names the setting at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class CertificateSet:
    cert: bytes
    key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )


class ServerCertificates:
    """The files named by ``tls_cert``, ``tls_key`` and ``tls_client_ca``."""

    def __init__(self, settings: ServerSettings, telemetry: Telemetry) -> None:
        assert settings.tls_cert is not None and settings.tls_key is not None
        self._files: dict[str, Path] = {"tls_cert": settings.tls_cert, "tls_key": settings.tls_key}
        if settings.tls_client_ca is not None:
            self._files["tls_client_ca"] = settings.tls_client_ca
        self.mutual = settings.tls_client_ca is not None
        self._reloads = telemetry.tls_reloads
        self._lock = threading.Lock()  # gRPC may call fetch from several handshake threads
        self._seen: Signature = ()

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for ``add_secure_port``; a bad file set is a ``ConfigError``."""
        try:
            self._seen = self._signature()
            initial = self.load()
        except CertificateError as exc:
            raise ConfigError(exc.key, str(exc)) from None
        except OSError as exc:
            raise ConfigError("tls_cert", f"cannot read the TLS files: {exc}") from None
        return grpc.dynamic_ssl_server_credentials(
            initial.configuration(),
            self.fetch,
            require_client_authentication=self.mutual,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: ``None`` means keep the current one."""
        with self._lock:
            try:
                signature = self._signature()
            except OSError as exc:
                self._keep(f"cannot stat the TLS files: {exc}", signature=None)
                return None
            if signature == self._seen:
                return None
            try:
                loaded = self.load()
            except (CertificateError, OSError) as exc:
                self._keep(str(exc), signature)
                return None
            self._seen = signature
            self._reloads.labels("ok").inc()
            log.info(
                "TLS certificates reloaded", extra={"files": list(map(str, self._files.values()))}
            )
            return loaded.configuration()

    def _keep(self, problem: str, signature: Signature | None) -> None:
        """Log and count a failed reload once per file change; the previous set stays."""
        if signature is not None:
            self._seen = signature
        self._reloads.labels("error").inc()
        log.warning("TLS files not reloaded; serving the previous certificate: %s", problem)

    def load(self) -> CertificateSet:
        """Read and check the files: PEM, the key matching the certificate, a readable CA.

        The check reads the files again through ``ssl``; a file that changed in between was
        caught mid-rotation and is refused, so what was checked is what gets served.
        """
        files = self._files
        data = {name: path.read_bytes() for name, path in files.items()}
        if b"-----BEGIN CERTIFICATE-----" not in data["tls_cert"]:
            raise CertificateError("tls_cert", f"{files['tls_cert']} holds no PEM certificate")
        if b"PRIVATE KEY-----" not in data["tls_key"]:
            raise CertificateError("tls_key", f"{files['tls_key']} holds no PEM private key")
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            check.load_cert_chain(files["tls_cert"], files["tls_key"])
        except ssl.SSLError as exc:
            raise CertificateError(
                "tls_key", f"the key does not match the certificate ({exc.reason})"
            ) from None
        client_ca = data.get("tls_client_ca")
        if client_ca is not None:
            try:
                check.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise CertificateError("tls_client_ca", f"not a PEM CA bundle ({exc})") from None
        for name, path in files.items():
            if path.read_bytes() != data[name]:
                raise CertificateError(name, f"{path} changed while it was being read")
        return CertificateSet(data["tls_cert"], data["tls_key"], client_ca)

    def _signature(self) -> Signature:
        stats = [os.stat(path) for path in self._files.values()]
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)
