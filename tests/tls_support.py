"""Certificates for the TLS tests, made with the openssl command line, and the TLS servers of
scripts/tls_services.sh (a Redis and a RabbitMQ node that require client certificates)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "tls_services.sh"
#: where scripts/tls_services.sh serves, as its defaults
REDIS_TLS_PORT = 6480
SENTINEL_TLS_PORT = 26480
#: the service the TLS sentinel monitors
SENTINEL_TLS_SERVICE = "order-timeouts-tls"
RABBITMQ_TLS_PORT = 5691


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    """`name`.pem and `name`.key: a self-signed CA."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=order-timeouts test {name}",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=folder,
    )  # fmt: skip


def make_signed(folder: Path, name: str, ca: str, extensions: str) -> None:
    """`name`.pem and `name`.key, signed by the CA `ca` with these X.509 v3 extensions."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=folder)  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=folder,
    )  # fmt: skip
    os.chmod(folder / f"{name}.key", 0o644)  # the RabbitMQ node reads its copy as the rabbitmq user


def make_certificates(folder: Path) -> Path:
    """A CA; a server certificate for 127.0.0.1 and localhost and a client certificate, both signed
    by it; and `other-ca`, a CA that signed neither."""
    if shutil.which("openssl") is None:
        _missing("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_signed(folder, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    make_signed(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return folder


def tls_services(*args: str) -> None:
    """scripts/tls_services.sh with these arguments. A machine without the servers skips the test,
    and fails it when CI=true."""
    rabbitmq = shutil.which("rabbitmq-server") or Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()
    if shutil.which("redis-server") is None or not rabbitmq:
        _missing("redis-server and rabbitmq-server are needed for the TLS tests (scripts/services.sh)")
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0:
        raise AssertionError(f"tls_services.sh {' '.join(args)} failed: {done.stderr.strip()}")


def _missing(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
