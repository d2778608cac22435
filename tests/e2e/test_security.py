"""TLS (server-only and mutual) and the bearer-token check on the gRPC API, in-process and through
`duetserve generate`. Certificates are made in the test (cryptography)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
from controlplane.security import auth_metadata, client_credentials
from shared.config import TlsConfig
from tests.e2e.conftest import serve

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"


def _write(folder: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def make_pki(folder: Path) -> dict[str, tuple[str, str]]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "duetserve test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": _write(folder, "ca", ca_key, ca)}
    for name, usage, san in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("client")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[name] = _write(folder, name, key, cert)
    return out


async def _status(coro) -> grpc.StatusCode:  # noqa: ANN001
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_tls_and_bearer_token(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsConfig(cert_file=pki["server"][0], key_file=pki["server"][1])
    async with serve("tiny", tls=tls, auth_token=TOKEN) as served:
        address = f"localhost:{served.plane.port}"
        async with grpc.aio.secure_channel(address, client_credentials(pki["ca"][0])) as channel:
            stub = pb_grpc.GenerationStub(channel)
            ok = [r async for r in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), max_tokens=3,
                                                                      ignore_eos=True), metadata=auth_metadata(TOKEN))]
            assert ok[-1].completion_tokens == 3
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=auth_metadata(TOKEN))
            assert info.model == "tiny"
            for metadata in ((), auth_metadata("wrong"), (("authorization", TOKEN),)):
                assert await _status(stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)) \
                    == grpc.StatusCode.UNAUTHENTICATED
                assert await _status(stub.Abort(pb.AbortRequest(request_id="x"), metadata=metadata)) \
                    == grpc.StatusCode.UNAUTHENTICATED
                call = stub.Generate(pb.GenerateRequest(text="hi"), metadata=metadata)
                assert await _status(call.read()) == grpc.StatusCode.UNAUTHENTICATED
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # health needs no token
        async with grpc.aio.insecure_channel(address) as plain:  # plaintext to a TLS port fails
            assert await _status(pb_grpc.GenerationStub(plain).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)) \
                == grpc.StatusCode.UNAVAILABLE
        cli = [sys.executable, "-m", "controlplane.cli", "generate", "Hi", "--address", address, "--max-tokens", "2",
               "--tls-ca", pki["ca"][0], "--timeout", "60"]
        code, err = await run_cli([*cli, "--auth-token", TOKEN])
        assert code == 0 and "completion_tokens=2" in err, err
        code, err = await run_cli(cli, env={"PATH": "/usr/bin:/bin", "DUETSERVE_AUTH_TOKEN": "nope"})
        assert code == 1 and "UNAUTHENTICATED" in err, err


async def run_cli(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a CLI without blocking the event loop (the server under test runs on it)."""
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, err.decode()


async def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsConfig(cert_file=pki["server"][0], key_file=pki["server"][1], client_ca_file=pki["ca"][0])
    async with serve("tiny", tls=tls) as served:
        address = f"localhost:{served.plane.port}"
        with_cert = client_credentials(pki["ca"][0], pki["client"][0], pki["client"][1])
        async with grpc.aio.secure_channel(address, with_cert) as channel:
            info = await pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            assert info.model == "tiny"
        async with grpc.aio.secure_channel(address, client_credentials(pki["ca"][0])) as channel:
            code = await _status(pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("flags", [["--tls-cert", "c.pem"], ["--tls-key", "k.pem"]])
def test_tls_flags_come_in_pairs(flags: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "controlplane.cli", "serve", *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "--tls-cert and --tls-key" in out.stderr


def test_an_unloadable_certificate_is_named_before_serving(tmp_path: Path) -> None:
    """gRPC reported an unreadable pair as "Failed to bind"; the pair is loaded first and the file named."""
    from controlplane.security import check_tls

    pki = make_pki(tmp_path)
    cert, key = pki["server"]
    check_tls(TlsConfig(cert_file=cert, key_file=key, client_ca_file=pki["ca"][0]))  # a good pair loads
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("not a certificate")
    with pytest.raises(ValueError, match="garbled.pem"):
        check_tls(TlsConfig(cert_file=str(garbled), key_file=key))
    with pytest.raises(ValueError, match="client CA"):
        check_tls(TlsConfig(cert_file=cert, key_file=key, client_ca_file=str(garbled)))
    out = subprocess.run([sys.executable, "-m", "controlplane.cli", "serve", "--tls-cert", str(garbled), "--tls-key", key],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "garbled.pem" in out.stderr and "Traceback" not in out.stderr, out.stderr
