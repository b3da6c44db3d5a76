"""Fetching files the user names by URL: http(s) downloads with progress and retries, data: URIs.

A download is bounded, because a socket timeout alone restarts at every byte and a server
that drips a byte every few seconds would hold a training or a prediction forever:

  * an overall deadline, DOWNLOAD_DEADLINE_S (default an hour: a 4 GiB archive, the cap, at
    1.2 MB/s), shared by the retries and enforced by a watchdog that cuts the connection, so
    that it also holds while the TLS handshake or the response headers drip;
  * a minimum rate, DOWNLOAD_MIN_BYTES_PER_S (default 64 KiB/s; 0 turns it off), averaged
    over DOWNLOAD_RATE_WINDOW_S (default 60 s); the first window is the grace period.

Neither failure is retried (the retries are for network and server errors), and the
variables are read at each download, so that an operator or a test can set them.

Link-local addresses (169.254.0.0/16, fe80::/10, and their IPv4-mapped IPv6 forms) and the
name metadata.google.internal are refused: that is where cloud instance metadata answers,
with the instance's credentials, to any process on the machine that asks. The URL's host is
checked before connecting, every redirect's target before following it, and the address
actually connected to (a DNS name may resolve to 169.254.169.254; behind an HTTP proxy that
is the proxy's). Loopback and private addresses stay allowed: operators have internal mirrors.
"""

import base64
import binascii
import contextlib
import functools
import http.client
import ipaddress
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.errors import UserInputError
from src.local_files import special_file_problem
from src.log import log

PROGRESS_EVERY_S = 10
DEADLINE_S = 3600.0  # DOWNLOAD_DEADLINE_S
MIN_BYTES_PER_S = 64 * 1024  # DOWNLOAD_MIN_BYTES_PER_S
RATE_WINDOW_S = 60.0  # DOWNLOAD_RATE_WINDOW_S
SOCKET_TIMEOUT_S = 60.0  # the longest wait for one read, whatever the window
CHUNK_BYTES = 1 << 20

METADATA_HOSTS = frozenset({"metadata.google.internal"})
# AWS's instance metadata over IPv6: inside fc00::/7, whose other addresses stay allowed.
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254")})
# What the resolver reads as IPv4 besides dotted quads: 2852039166, 0xa9fea9fe, 0251.0376.0.1.
_LEGACY_IPV4 = re.compile(r"[0-9a-fx.]+")


def fetch_to_file(source: str, destination: Path, what: str) -> Path:
    """A local path is returned as is; an http(s) URL or a data: URI is written to `destination`."""
    if source.startswith(("https://", "http://")):
        download(source, destination, what)
        return destination
    if source.startswith("data:"):
        destination.write_bytes(decode_data_uri(source, what))
        return destination
    path = Path(source.removeprefix("file://"))
    special = special_file_problem(path, what)
    if special:
        raise UserInputError(f"{special}: give a weights archive")
    if not path.is_file():
        raise UserInputError(f"{what}: no such file: {source}")
    return path


def decode_data_uri(uri: str, what: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma:
        raise UserInputError(f"{what}: malformed data: URI (no comma)")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as error:
            raise UserInputError(f"{what}: data: URI is not valid base64 ({error})") from error
    return urllib.parse.unquote_to_bytes(payload)


def public_url(url: str) -> str:
    """A URL as it may be logged or written into outputs: without user:password@, query or
    fragment (a presigned URL's signature is a credential)."""
    if not url.startswith(("https://", "http://")):
        return url
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def refused_address(host: str) -> str | None:
    """Why a host name or IP address must not be downloaded from, or None where it may."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name in METADATA_HOSTS:
        return "a cloud instance metadata host name"
    address = _ip_address(name.partition("%")[0])  # an IPv6 scope (fe80::1%eth0) aside
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_link_local:
        return "a link-local address (cloud instance metadata)"
    if address in METADATA_ADDRESSES:
        return "a cloud instance metadata address"
    return None


def _ip_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(name):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            return None
    return None


@dataclass(frozen=True)
class Limits:
    """How long a download may take and how slowly it may go, from the environment."""

    deadline_s: float
    min_bytes_per_s: float
    window_s: float

    @classmethod
    def from_environment(cls) -> "Limits":
        return cls(
            deadline_s=_setting("DOWNLOAD_DEADLINE_S", DEADLINE_S, zero_allowed=False),
            min_bytes_per_s=_setting("DOWNLOAD_MIN_BYTES_PER_S", MIN_BYTES_PER_S),
            window_s=_setting("DOWNLOAD_RATE_WINDOW_S", RATE_WINDOW_S, zero_allowed=False),
        )


def _setting(name: str, default: float, zero_allowed: bool = True) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 or (zero_allowed and value == 0))):
        least = "0 or more" if zero_allowed else "more than 0"
        raise ValueError(f"{name}={raw!r}: expected a number of seconds or bytes, {least}")
    return value


def download(url: str, destination: Path, what: str, attempts: int = 3) -> None:
    """Download with a progress line every 10 seconds, within the deadline and above the
    minimum rate; retry network and server errors, never a deadline or rate failure."""
    job = _Download(url, what, Limits.from_environment())
    job.check_url(url)
    for attempt in range(1, attempts + 1):
        if job.remaining() <= 0:
            raise job.deadline_error()
        try:
            _download_once(job, destination)
            return
        # URLError, HTTPError and socket errors are OSErrors; a malformed response is not
        except (OSError, http.client.HTTPException) as error:
            client_error = isinstance(error, urllib.error.HTTPError) and error.code < 500
            if attempt == attempts or client_error:
                raise UserInputError(
                    f"{what}: could not download {public_url(url)}: {error}"
                ) from error
            log(f"{what}: download failed ({error}); retrying ({attempt}/{attempts - 1})")
            time.sleep(max(0.0, min(attempt, job.remaining())))


class _Download:
    """One download's limits, its checks, and the connection its watchdog cuts."""

    def __init__(self, url: str, what: str, limits: Limits) -> None:
        self.url, self.what, self.limits = url, what, limits
        self.deadline = time.monotonic() + limits.deadline_s
        self.done = self.total = 0
        self.expired = False
        self.reader: socket.socket | None = None  # the socket the body is read from
        # Duplicates of each connection's socket, for the watchdog: TLS wraps the socket
        # into another object (detaching the first), and a duplicate shuts either down.
        self.cutters: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def read_timeout(self) -> float:
        """A wait for one read never outlasts the deadline, nor (rate checked) one window."""
        limit = min(SOCKET_TIMEOUT_S, self.remaining())
        if self.limits.min_bytes_per_s:
            limit = min(limit, self.limits.window_s)
        return max(limit, 0.01)

    def check_url(self, url: str, redirected: bool = False) -> None:
        parts = urllib.parse.urlsplit(url)
        via = f" (redirected from {public_url(self.url)})" if redirected else ""
        if parts.scheme not in ("http", "https"):
            raise UserInputError(f"{self.what}: refusing a {parts.scheme}: URL{via}")
        host = parts.hostname or ""
        if reason := refused_address(host):
            raise UserInputError(f"{self.what}: refusing to download from {host}{via}: {reason}")

    def connected(self, sock: socket.socket, host: str) -> None:
        """Check the address actually connected to; let the watchdog cut this connection."""
        peer = str(sock.getpeername()[0])
        if reason := refused_address(peer):
            named = peer if peer == host else f"{host} ({peer})"
            raise UserInputError(f"{self.what}: refusing to download from {named}: {reason}")
        with self._lock:
            self.cutters.append(sock.dup())
            expired = self.expired
        if expired:
            self.cut()

    def end_attempt(self) -> None:
        with self._lock:
            cutters, self.cutters, self.reader = self.cutters, [], None
        for cutter in cutters:
            cutter.close()

    def cut(self) -> None:
        """The watchdog, at the deadline: a read blocked in any phase returns or fails."""
        with self._lock:
            self.expired = True
            for cutter in self.cutters:
                with contextlib.suppress(OSError):
                    cutter.shutdown(socket.SHUT_RDWR)

    def deadline_error(self) -> UserInputError:
        share = f" of {self.total / 2**20:.1f}" if self.total else ""
        return UserInputError(
            f"{self.what}: download of {public_url(self.url)} stopped: not done after "
            f"{self.limits.deadline_s:g} s (DOWNLOAD_DEADLINE_S), "
            f"{self.done / 2**20:.1f}{share} MiB received"
        )

    def rate_error(self, received: int) -> UserInputError:
        return UserInputError(
            f"{self.what}: download of {public_url(self.url)} stopped: {received} bytes in the "
            f"last {self.limits.window_s:g} s (DOWNLOAD_RATE_WINDOW_S), under the minimum of "
            f"{_per_second(self.limits.min_bytes_per_s)} (DOWNLOAD_MIN_BYTES_PER_S)"
        )

    def opener(self) -> urllib.request.OpenerDirector:
        return urllib.request.build_opener(
            _CheckedHTTPHandler(self), _CheckedHTTPSHandler(self), _CheckedRedirects(self)
        )


def _per_second(rate: float) -> str:
    if rate >= 1024 and rate % 1024 == 0:
        return f"{rate / 1024:g} KiB/s"
    return f"{rate:g} bytes/s"


class _CheckedOpen:
    """do_open with connections that show their sockets to the download."""

    job: _Download

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        connection = functools.partial(_checked_connection, http_class, self.job)
        return super().do_open(connection, req, **kwargs)  # type: ignore[misc]


def _checked_connection(
    http_class: type[http.client.HTTPConnection], job: _Download, host: str, **options: Any
) -> http.client.HTTPConnection:
    """A connection whose socket is checked (and duplicated for the watchdog) as soon as TCP
    connects, before the TLS handshake or a proxy tunnel: no byte of a request reaches a
    refused peer, and a handshake that drips can be cut. Once connected (after TLS), the
    socket the body is read from is noted, for the read timeouts."""
    conn = http_class(host, **options)
    create, connect = conn._create_connection, conn.connect

    def create_checked(address: tuple[str, int], *args: Any, **kw: Any) -> socket.socket:
        sock = create(address, *args, **kw)
        try:
            job.connected(sock, address[0])
        except BaseException:
            sock.close()
            raise
        return sock

    def connect_noted() -> None:
        connect()
        job.reader = conn.sock

    conn._create_connection = create_checked  # type: ignore[method-assign]
    conn.connect = connect_noted  # type: ignore[method-assign]
    return conn


class _CheckedHTTPHandler(_CheckedOpen, urllib.request.HTTPHandler):
    def __init__(self, job: _Download) -> None:
        super().__init__()
        self.job = job


class _CheckedHTTPSHandler(_CheckedOpen, urllib.request.HTTPSHandler):
    def __init__(self, job: _Download) -> None:
        super().__init__()
        self.job = job


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Check where a redirect leads before following it."""

    def __init__(self, job: _Download) -> None:
        self.job = job

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        try:
            self.job.check_url(newurl, redirected=True)
        except UserInputError:
            fp.close()
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _RateMeter:
    """Bytes received over the last window, from samples of the running count."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.started = time.monotonic()
        self.samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    def shortfall(self, done: int) -> int | None:
        """The bytes of the last window if under the minimum (after the first window, the
        grace period), else None."""
        window, now = self.limits.window_s, time.monotonic()
        if now - self.samples[-1][0] >= window / 16:  # a few samples a window, not one a read
            self.samples.append((now, done))
        while len(self.samples) > 1 and self.samples[1][0] <= now - window:
            self.samples.popleft()  # samples[0] stays the last one at or before the window
        if not self.limits.min_bytes_per_s or now - self.started < window:
            return None
        received = done - self.samples[0][1]
        return received if received < self.limits.min_bytes_per_s * window else None


def _download_once(job: _Download, destination: Path) -> None:
    started = time.monotonic()
    job.done = job.total = 0
    watchdog = threading.Timer(max(job.remaining(), 0.0), job.cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        _transfer(job, destination)
    except UserInputError:
        raise
    except Exception as error:
        if job.expired or job.remaining() <= 0:  # cut by the watchdog, or timed out at the end
            raise job.deadline_error() from error
        raise
    finally:
        watchdog.cancel()
        job.end_attempt()
    log(
        f"downloaded {public_url(job.url)} ({job.done / 2**20:.1f} MiB in "
        f"{time.monotonic() - started:.1f} s)"
    )


def _transfer(job: _Download, destination: Path) -> None:
    with (
        job.opener().open(job.url, timeout=job.read_timeout()) as response,
        destination.open("wb") as out,
    ):
        job.total = int(response.headers.get("Content-Length") or 0)
        meter, last_report = _RateMeter(job.limits), time.monotonic()
        while chunk := _read(job, response):
            out.write(chunk)
            job.done += len(chunk)
            if (received := meter.shortfall(job.done)) is not None:
                raise job.rate_error(received)
            if job.remaining() <= 0:
                raise job.deadline_error()
            if time.monotonic() - last_report > PROGRESS_EVERY_S:
                share = f" of {job.total / 2**20:.0f} MiB" if job.total else ""
                log(f"downloaded {job.done / 2**20:.0f} MiB{share}")
                last_report = time.monotonic()
    if job.expired:  # the watchdog's cut reads as the end of the body
        raise job.deadline_error()
    if job.total and job.done < job.total:
        raise ConnectionError(f"connection closed after {job.done} of {job.total} bytes")


def _read(job: _Download, response: http.client.HTTPResponse) -> bytes:
    """What has arrived (read1: not waiting for a whole chunk), with a timeout that lets
    the deadline and rate checks run; a read timed out by the window is a rate failure."""
    if job.reader is not None:
        job.reader.settimeout(job.read_timeout())
    try:
        return response.read1(CHUNK_BYTES)
    except TimeoutError:
        if job.remaining() <= 0.05:
            raise job.deadline_error() from None
        if job.limits.min_bytes_per_s and job.limits.window_s <= SOCKET_TIMEOUT_S:
            raise job.rate_error(0) from None  # nothing at all for a whole window
        raise


def describe_source(source: str) -> str:
    """A source for logs and metadata: a URL without credentials or query, a data: URI by its
    size (it can be a hundred megabytes), a path as given."""
    if source.startswith("data:"):
        return f"data: URI ({len(source) / 2**20:.1f} MiB)"
    return public_url(source)
