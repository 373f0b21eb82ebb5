"""TLS and shared-token auth on a real server; secure CLI defaults."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from jaxspec import serve
from serving.auth import load_token
from serving.build import EngineOptions, load_engine
from serving.client import JaxSpecClient
from serving.server import ServerOptions
from serving.testing import BackgroundServer, persistent_compilation_cache

TOKEN = "s3cret-token-for-tests"
OPTS = EngineOptions(model="tiny-moe", slots=16, max_len=64, default_max_tokens=8)


def _self_signed_with_cryptography(cert: Path, key: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def _self_signed_with_openssl(cert: Path, key: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    try:
        _self_signed_with_cryptography(cert, key)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        _self_signed_with_openssl(cert, key)
    return cert, key


@pytest.fixture(scope="module")
def secure_server(tls_files):
    cert, key = tls_files
    with persistent_compilation_cache():
        server = BackgroundServer(
            lambda: load_engine(OPTS),
            ServerOptions(port=0, tls_cert=str(cert), tls_key=str(key), auth_token=TOKEN, metrics_port=0),
        ).start()
        try:
            yield server
        finally:
            server.close()


def _client(server, cert: Path, token: str | None) -> JaxSpecClient:
    return JaxSpecClient(server.target, auth_token=token, root_certificates=cert, timeout=30)


def test_tls_with_token_works(secure_server, tls_files):
    with _client(secure_server, tls_files[0], TOKEN) as client:
        resp = client.generate("hello", max_tokens=4, ignore_eos=True)
        assert resp.usage.completion_tokens == 4
        assert "".join(m.text for m in client.generate_stream("hello", max_tokens=4, ignore_eos=True)) == resp.text
        assert client.model_info().model_id == "tiny-moe"


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"], ids=["missing", "wrong", "longer"])
def test_missing_or_wrong_token_is_unauthenticated(secure_server, tls_files, token):
    with _client(secure_server, tls_files[0], token) as client:
        for call in (lambda: client.generate("hello", max_tokens=2),
                     lambda: list(client.generate_stream("hello", max_tokens=2)),
                     client.model_info, client.server_info, lambda: client.abort("x")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open for probes without the token.
        assert client.health() == "SERVING"
        assert client.health("jaxspec.v1.JaxSpec") == "SERVING"


def test_plaintext_client_cannot_talk_to_tls_server(secure_server):
    with JaxSpecClient(secure_server.target, auth_token=TOKEN, timeout=5) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hello", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_untrusted_certificate_is_refused(secure_server, tmp_path):
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other.key"
    try:
        _self_signed_with_cryptography(other_cert, other_key)
    except ImportError:
        _self_signed_with_openssl(other_cert, other_key)
    with _client(secure_server, other_cert, TOKEN) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hello", max_tokens=2, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_load_token(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert load_token(path) == TOKEN
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_token(path)
    path.write_text("two tokens")
    with pytest.raises(ValueError, match="whitespace"):
        load_token(path)


def test_cli_defaults_are_loopback_and_no_auth(capsys):
    args = serve.parse_args([])
    assert args.host == "127.0.0.1"
    assert args.tls_cert is None and args.auth_token_file is None
    with pytest.raises(SystemExit) as exit_info:
        serve.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--draft", "--spec-method", "--num-speculative-tokens", "--slots", "--max-len", "--port",
                 "--host", "--tls-cert", "--tls-key", "--auth-token-file", "--metrics-port", "--max-waiting",
                 "--compilation-cache-dir", "--grace-period"):
        assert flag in help_text


@pytest.mark.parametrize("argv,message", [
    (["--tls-cert", "x.pem"], "both a certificate and a key"),
    (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], "No such file"),
    (["--auth-token-file", "/nonexistent/token"], "No such file"),
    (["--model", "tiny-moe", "--spec-method", "draft"], "draft model"),
    (["--slots", "0"], "slots must be >= 1"),
])
def test_cli_refuses_bad_options_before_loading(argv, message, capsys):
    assert serve.main(argv) == 2
    assert message in capsys.readouterr().err
