"""TLS and mutual TLS round trips with certificates made for the test (openssl, else skipped)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_helpers import serve, server_config

from nmt.server.client import AsyncTranslationClient, Connection

pytestmark = pytest.mark.asyncio


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, cwd: Path, usage: str) -> None:
    """name.key + name.pem (SAN 127.0.0.1 and localhost), signed by ca.pem."""
    (cwd / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
    _openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=cwd,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.pem",
        "-extfile",
        f"{name}.ext",
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (and neither is the cryptography package)")
    cwd = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=nmt-test-ca",
        cwd=cwd,
    )
    _signed("server", cwd, "serverAuth")
    _signed("client", cwd, "clientAuth")
    return cwd


async def test_tls_round_trip(grpc_bundle, grpc_translator, certs: Path) -> None:
    cfg = server_config(grpc_bundle, tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))  # noqa
    async with serve(cfg, grpc_translator) as server:
        target = f"127.0.0.1:{server.port}"
        async with AsyncTranslationClient(Connection(target, ca=str(certs / "ca.pem"))) as client:
            assert len(await client.translate(["A dog."], beam_size=1, timeout=10)) == 1
            assert await client.health(timeout=10) == "SERVING"
        async with AsyncTranslationClient(Connection(target)) as plain:  # no TLS: the handshake fails
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await plain.translate(["A dog."], timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate(grpc_bundle, grpc_translator, certs: Path) -> None:
    cfg = server_config(
        grpc_bundle,
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),  # noqa
        tls_ca=str(certs / "ca.pem"),
    )
    async with serve(cfg, grpc_translator) as server:
        target, ca = f"127.0.0.1:{server.port}", str(certs / "ca.pem")
        mutual = Connection(target, ca=ca, cert=str(certs / "client.pem"), key=str(certs / "client.key"))
        async with AsyncTranslationClient(mutual) as client:
            assert len(await client.translate(["A dog.", "A cat."], beam_size=1, timeout=10)) == 2
        async with AsyncTranslationClient(Connection(target, ca=ca)) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await anonymous.translate(["A dog."], timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
