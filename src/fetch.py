"""Fetching files the user names by URL: http(s) downloads with progress and retries, data: URIs."""

import base64
import binascii
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from src.errors import UserInputError
from src.log import log

PROGRESS_EVERY_S = 10


def fetch_to_file(source: str, destination: Path, what: str) -> Path:
    """A local path is returned as is; an http(s) URL or a data: URI is written to `destination`."""
    if source.startswith(("https://", "http://")):
        download(source, destination, what)
        return destination
    if source.startswith("data:"):
        destination.write_bytes(decode_data_uri(source, what))
        return destination
    path = Path(source.removeprefix("file://"))
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


def download(url: str, destination: Path, what: str, attempts: int = 3) -> None:
    """Download with a progress line every 10 seconds; retry network and server errors."""
    for attempt in range(1, attempts + 1):
        try:
            _download_once(url, destination)
            return
        except OSError as error:  # URLError, HTTPError and socket errors are OSErrors
            client_error = isinstance(error, urllib.error.HTTPError) and error.code < 500
            if attempt == attempts or client_error:
                raise UserInputError(
                    f"{what}: could not download {public_url(url)}: {error}"
                ) from error
            log(f"{what}: download failed ({error}); retrying ({attempt}/{attempts - 1})")
            time.sleep(attempt)


def _download_once(url: str, destination: Path) -> None:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=60) as response, destination.open("wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done, last_report = 0, time.monotonic()
        while chunk := response.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            if time.monotonic() - last_report > PROGRESS_EVERY_S:
                share = f" of {total / 2**20:.0f} MiB" if total else ""
                log(f"downloaded {done / 2**20:.0f} MiB{share}")
                last_report = time.monotonic()
    log(
        f"downloaded {public_url(url)} ({done / 2**20:.1f} MiB in "
        f"{time.monotonic() - started:.1f} s)"
    )


def describe_source(source: str) -> str:
    """A source for logs and metadata: a URL without credentials or query, a data: URI by its
    size (it can be a hundred megabytes), a path as given."""
    if source.startswith("data:"):
        return f"data: URI ({len(source) / 2**20:.1f} MiB)"
    return public_url(source)
