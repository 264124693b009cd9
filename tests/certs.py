"""Throwaway certificate authorities and certificates for TLS tests, made with the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DAYS = "2"
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("the TLS tests need the openssl command (Debian: apt-get install openssl)")
    subprocess.run([binary, *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


class Authority:
    """A self-signed CA in ``directory`` that issues server and client certificates."""

    def __init__(self, directory: Path, name: str = "test-ca") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = name
        self.cert = directory / f"{name}.crt"
        self.key = directory / f"{name}.key"
        _openssl(
            "req", "-x509", *EC_KEY, "-keyout", str(self.key), "-out", str(self.cert),
            "-days", DAYS, "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def issue(self, name: str, *, client: bool = False) -> KeyPair:
        """A leaf certificate for ``localhost``/127.0.0.1 (server) or a client identity."""
        pair = KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        request = self.directory / f"{name}.csr"
        extensions = self.directory / f"{name}.ext"
        usage = "clientAuth" if client else "serverAuth"
        extensions.write_text(
            f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n"
        )
        _openssl(
            "req", *EC_KEY, "-keyout", str(pair.key), "-out", str(request), "-subj", f"/CN={name}"
        )
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-days", DAYS, "-extfile", str(extensions), "-out", str(pair.cert),
        )  # fmt: skip
        return pair
