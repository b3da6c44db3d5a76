"""The project's downloader: deadline, minimum rate, refused addresses, retries; real sockets on
127.0.0.1 only (any other resolution or connection fails the test)."""

import base64
import contextlib
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import src.fetch
from src.errors import UserInputError
from src.fetch import download, fetch_to_file, refused_address

MIRROR = "mirror.internal.test"  # a made-up name that the tests' resolver maps to 127.0.0.1
SECRET = "X-Amz-Signature=s3cr3t"

Respond = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve only 127.0.0.1 and MIRROR: a refused address reached by mistake fails loudly
    instead of waiting on a network the sandbox does not have."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("127.0.0.1", MIRROR):
            return real("127.0.0.1", *args, **kwargs)
        raise AssertionError(f"the download tried to resolve or connect to {host}")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: the server's context and one that trusts it."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    command += ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


@pytest.fixture
def https(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> ssl.SSLContext:
    """The server's TLS context; the client (urllib's default context) trusts it."""
    monkeypatch.setattr(ssl, "_create_default_https_context", lambda: tls[1])
    return tls[0]


@contextlib.contextmanager
def serve(
    *responses: Respond, tls: ssl.SSLContext | None = None
) -> Iterator[tuple[str, list[str]]]:
    """A server on 127.0.0.1 answering its n-th request with responses[n] (the last one for
    every later request), over TLS with `tls`; yields its base URL and the paths asked."""
    requested: list[str] = []
    stopping = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            requested.append(self.path)
            self.stopping = stopping
            respond = responses[min(len(requested), len(responses)) - 1]
            with contextlib.suppress(OSError):  # the client hung up: what the tests do
                respond(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        scheme = "https" if tls else "http"
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}", requested
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()


def body(payload: bytes, status: int = 200) -> Respond:
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    return respond


def drip(every_s: float, length: int = 1000) -> Respond:
    """Headers at once, then one byte of the body every `every_s` seconds."""

    def respond(handler: Any) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        for _ in range(length):
            if handler.stopping.wait(every_s):
                return
            handler.wfile.write(b"x")

    return respond


def drip_headers(every_s: float) -> Respond:
    """A status line, then the headers one byte every `every_s` seconds (500 of them)."""

    def respond(handler: Any) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
        for _ in range(500):
            if handler.stopping.wait(every_s):
                return
            handler.wfile.write(b"a")

    return respond


def redirect(location: str) -> Respond:
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


def timed_download(url: str, destination: Path, what: str = "replicate_weights") -> str:
    """The message of the UserInputError the download fails with, within 30 s."""
    started = time.monotonic()
    with pytest.raises(UserInputError) as caught:
        download(url, destination, what)
    assert time.monotonic() - started < 30
    return str(caught.value)


def test_a_download_writes_the_bytes(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 12_000  # 3 MiB: several reads
    with serve(body(payload)) as (url, requested):
        download(f"{url}/weights.tar", tmp_path / "out", "replicate_weights")
    assert (tmp_path / "out").read_bytes() == payload
    assert requested == ["/weights.tar"]


def test_a_server_error_is_retried_and_a_client_error_is_not(tmp_path: Path) -> None:
    with serve(body(b"busy", 503), body(b"weights")) as (url, requested):
        download(f"{url}/w", tmp_path / "out", "replicate_weights")
    assert (tmp_path / "out").read_bytes() == b"weights"
    assert len(requested) == 2

    with serve(body(b"no", 404)) as (url, requested):
        message = timed_download(f"{url}/w?{SECRET}", tmp_path / "out")
    assert "404" in message and "s3cr3t" not in message
    assert len(requested) == 1


def test_a_body_under_the_minimum_rate_stops_without_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOWNLOAD_MIN_BYTES_PER_S", "100")
    monkeypatch.setenv("DOWNLOAD_RATE_WINDOW_S", "1")
    with serve(drip(every_s=0.5)) as (url, requested):
        message = timed_download(f"{url}/w.tar?{SECRET}", tmp_path / "out")
    assert message.startswith(f"replicate_weights: download of {url}/w.tar stopped: ")
    assert "bytes in the last 1 s (DOWNLOAD_RATE_WINDOW_S), under the minimum of" in message
    assert message.endswith("100 bytes/s (DOWNLOAD_MIN_BYTES_PER_S)")
    assert len(requested) == 1
    assert "s3cr3t" not in capsys.readouterr().out


def test_a_body_past_the_deadline_stops_without_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOWNLOAD_DEADLINE_S", "1")  # the rate (64 KiB/s) is still in its grace
    with serve(drip(every_s=0.1)) as (url, requested):  # 100 s for the whole body
        message = timed_download(f"{url}/w", tmp_path / "out", what="init_weights")
    assert message.startswith(f"init_weights: download of {url}/w stopped: not done after 1 s")
    assert "(DOWNLOAD_DEADLINE_S)" in message and "MiB received" in message
    assert len(requested) == 1


def test_the_deadline_holds_while_the_headers_drip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each byte restarts the socket timeout: only the watchdog stops this one."""
    monkeypatch.setenv("DOWNLOAD_DEADLINE_S", "1")
    with serve(drip_headers(every_s=0.2)) as (url, requested):  # 100 s for the headers
        message = timed_download(f"{url}/w", tmp_path / "out")
    assert "not done after 1 s (DOWNLOAD_DEADLINE_S)" in message
    assert len(requested) == 1


def test_over_tls_the_bytes_the_rate_and_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, https: ssl.SSLContext
) -> None:
    """TLS wraps the connected socket into another: reads and the watchdog must use that."""
    payload = bytes(range(256)) * 8_000
    with serve(body(payload), tls=https) as (url, _):
        download(f"{url}/w", tmp_path / "out", "init_weights")
    assert (tmp_path / "out").read_bytes() == payload

    monkeypatch.setenv("DOWNLOAD_MIN_BYTES_PER_S", "100")
    monkeypatch.setenv("DOWNLOAD_RATE_WINDOW_S", "1")
    with serve(drip(every_s=2.0), tls=https) as (url, _):  # silence for a whole window
        message = timed_download(f"{url}/w", tmp_path / "out")
    assert "0 bytes in the last 1 s (DOWNLOAD_RATE_WINDOW_S)" in message

    monkeypatch.setenv("DOWNLOAD_DEADLINE_S", "1")
    monkeypatch.setenv("DOWNLOAD_MIN_BYTES_PER_S", "0")
    with serve(drip_headers(every_s=0.2), tls=https) as (url, requested):
        message = timed_download(f"{url}/w", tmp_path / "out")
    assert "not done after 1 s (DOWNLOAD_DEADLINE_S)" in message
    assert len(requested) == 1


def test_the_deadline_holds_while_the_tls_handshake_drips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS record header announcing 16 KiB, then a byte every 0.2 s: only the watchdog,
    cutting the connection under the TLS socket, stops it."""
    monkeypatch.setenv("DOWNLOAD_DEADLINE_S", "1")
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def drip_handshake() -> None:
        peer, _ = listener.accept()
        with peer, contextlib.suppress(OSError):
            peer.sendall(b"\x16\x03\x03\x40\x00")
            while not stopping.wait(0.2):
                peer.sendall(b"\x00")

    thread = threading.Thread(target=drip_handshake, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        message = timed_download(f"https://127.0.0.1:{port}/w", tmp_path / "out")
    finally:
        stopping.set()
        listener.close()
    assert "not done after 1 s (DOWNLOAD_DEADLINE_S)" in message


def test_a_bad_setting_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOWNLOAD_DEADLINE_S", "soon")
    with pytest.raises(ValueError, match="DOWNLOAD_DEADLINE_S='soon'"):
        download("http://127.0.0.1:9/w", tmp_path / "out", "init_weights")


@pytest.mark.parametrize(
    ("url", "host", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "a link-local address"),
        ("http://[fe80::1]/x", "fe80::1", "a link-local address"),
        ("http://[::ffff:169.254.169.254]/x", "::ffff:169.254.169.254", "a link-local address"),
        (
            "http://metadata.google.internal/computeMetadata/v1/",
            "metadata.google.internal",
            "a cloud instance metadata host name",
        ),
        ("http://METADATA.GOOGLE.INTERNAL./x", "metadata.google.internal.", "metadata host name"),
        ("https://2852039166/x", "2852039166", "a link-local address"),  # 169.254.169.254
    ],
)
def test_metadata_addresses_are_refused_before_connecting(
    tmp_path: Path, url: str, host: str, reason: str
) -> None:
    # loopback_only fails the test on any resolution or connection to these hosts
    with pytest.raises(UserInputError) as caught:
        fetch_to_file(url, tmp_path / "out", "init_weights")
    assert str(caught.value).startswith(f"init_weights: refusing to download from {host}: ")
    assert reason in str(caught.value)


def test_a_redirect_to_instance_metadata_is_refused(tmp_path: Path) -> None:
    with serve(redirect("http://169.254.169.254/latest/meta-data/")) as (url, requested):
        message = timed_download(f"{url}/start?{SECRET}", tmp_path / "out", "init_weights")
    assert message == (
        f"init_weights: refusing to download from 169.254.169.254 (redirected from "
        f"{url}/start): a link-local address (cloud instance metadata)"
    )
    assert len(requested) == 1


def test_a_redirect_to_another_scheme_is_refused(tmp_path: Path) -> None:
    with serve(redirect("ftp://127.0.0.1/weights.tar")) as (url, _):
        message = timed_download(f"{url}/start", tmp_path / "out")
    assert message.startswith("replicate_weights: refusing a ftp: URL (redirected from")


def test_a_redirect_between_allowed_hosts_is_followed(tmp_path: Path) -> None:
    with serve(body(b"weights")) as (target, _), serve(redirect(f"{target}/w")) as (url, _):
        download(f"{url}/start", tmp_path / "out", "init_weights")
    assert (tmp_path / "out").read_bytes() == b"weights"


def test_a_name_that_resolves_to_an_allowed_address_downloads(tmp_path: Path) -> None:
    with serve(body(b"weights")) as (url, _):
        port = url.rpartition(":")[2]
        download(f"http://{MIRROR}:{port}/w", tmp_path / "out", "init_weights")
    assert (tmp_path / "out").read_bytes() == b"weights"


def test_the_address_connected_to_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that resolves to a refused address: here 127.0.0.1 stands for 169.254.169.254
    (which the sandbox cannot reach), refused only where the peer is checked."""
    real = src.fetch.refused_address

    def refused(host: str) -> str | None:
        return "a link-local address (as if)" if host == "127.0.0.1" else real(host)

    monkeypatch.setattr(src.fetch, "refused_address", refused)
    with serve(body(b"credentials")) as (url, requested):
        port = url.rpartition(":")[2]
        message = timed_download(f"http://{MIRROR}:{port}/w", tmp_path / "out", "init_weights")
    assert message == (
        f"init_weights: refusing to download from {MIRROR} (127.0.0.1): "
        "a link-local address (as if)"
    )
    assert requested == []  # no request was sent


@pytest.mark.parametrize(
    "host",
    [
        "169.254.1.2",
        "169.254.169.254",
        "fe80::1",
        "FE80::1%eth0",
        "[fe80::abcd]",
        "::ffff:169.254.169.254",
        "metadata.google.internal",
        "Metadata.Google.Internal.",
        "2852039166",
        "0xa9fea9fe",
        "fd00:ec2::254",
    ],
)
def test_refused_addresses(host: str) -> None:
    assert refused_address(host)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "10.0.0.1", "192.168.1.20", "::1", "fd00::1", "::ffff:127.0.0.1", "deadbeef"],
)
def test_loopback_private_and_names_are_allowed(host: str) -> None:
    assert refused_address(host) is None


def test_data_uris_and_local_paths_are_kept(tmp_path: Path) -> None:
    uri = "data:application/x-tar;base64," + base64.b64encode(b"weights").decode()
    assert fetch_to_file(uri, tmp_path / "out", "w").read_bytes() == b"weights"
    local = tmp_path / "local.tar"
    local.write_bytes(b"mine")
    assert fetch_to_file(str(local), tmp_path / "unused", "w") == local
