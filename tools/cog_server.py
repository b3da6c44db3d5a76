"""Run Cog's real HTTP server (coglet) on a project directory, for the tests and the demo.

`cog_server(project_dir, "predict" | "train")` does what the container does at start-up:
it writes `.cog/openapi_schema.json` (the `cog build` step, via `tools.cog_openapi`), starts
`python -m cog.server.http` on a free 127.0.0.1 port and waits for `GET /health-check` to
leave STARTING. The worker subprocess is started with the `python` found on PATH, so this
interpreter's `bin` goes first on PATH. HTTP uses only `urllib`.

How coglet 0.23.1 answers (measured through this helper, see tests/test_cog_openapi.py):

* The schema file is read from the server's working directory after setup. One file serves
  both modes: `/predictions` is validated against `Input`, `/trainings` against
  `TrainingInput` (whichever server mode). Without the file nothing is validated.
* Validation: a value out of `minimum`/`maximum`, a value not in the choices, a missing
  required input and an explicit `null` for an optional input all give 422 with
  `{"detail": [{"loc": ["body", "input", name], "msg": ..., "type": ...}]}`. Unknown input
  fields are dropped silently (the server log says "Stripped unknown input fields"); `2.0`
  passes for an `int` input and reaches Python as a float.
* SSE: `POST /predictions` with `Accept: text/event-stream` and the usual JSON body
  `{"input": {...}}` (no `Prefer` header) answers `text/event-stream`: `event: start`
  (`{"id", "status": "processing"}`), one `event: output` per chunk (`{"chunk", "index"}`),
  `event: log`/`metric` when any, and `event: completed` with the final prediction (its
  `output` is the list of chunks), after which the stream ends; `: keep-alive` comments every
  15 s. `PUT /predictions/{id}` with the same header does the same for a chosen id (or
  attaches to that id while it runs). Without `x-cog-streaming: true` in the schema, i.e.
  without `@cog.streaming` on `run()`, the answer is 406; training routes always answer 406.
* Async: `PUT /trainings/{id}` with `Prefer: respond-async` and a body
  `{"input": {...}, "webhook": url}` (optional `"webhook_events_filter"`) answers 202
  `{"id", "status": "starting"}`; a second one while it runs gets 409, the same id again
  gets 202 with its current state. Webhooks get the prediction JSON: first `processing`,
  then (throttled to one per 500 ms, extra ones dropped) log/output updates, then the
  terminal `succeeded`/`failed`/`canceled` with all logs. `POST /trainings/{id}/cancel`
  answers 200 `{}` (404 for an unknown id) and raises `cog.CancelationException` in
  `train()` at the next Python bytecode (a long C call delays it).
* Path outputs come back as `data:<mime>;base64,...` URIs when the server has no
  `--upload-url`, also inside an output object such as `TrainingOutput.weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from tools.cog_openapi import cog_yaml_refs, write_openapi_schema

DEFAULT_REFS = {"predict": "predict.py:Predictor", "train": "train.py:train"}
STUB_VARIABLES = {"predict": "COG_PREDICT_TYPE_STUB", "train": "COG_TRAIN_TYPE_STUB"}
READY_TIMEOUT_S = 120.0
WORKER_DIED = (
    "Cog's worker process died before setup() ran, so the server would stay STARTING for "
    "good: it starts the worker with the `python` found on PATH, which must be this "
    "environment's (put its bin folder first on PATH, as `make serve` does)"
)
TERMINAL_STATUSES = ("READY", "SETUP_FAILED", "DEFUNCT")


@dataclasses.dataclass(frozen=True)
class SseEvent:
    """One server-sent event: its name (`start`, `output`, ..., `completed`) and JSON data."""

    event: str
    data: Any


@dataclasses.dataclass
class CogServer:
    """A running `python -m cog.server.http` process and a small HTTP client for it."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path | None  # None: the output goes to this process's stdout
    status: str = "STARTING"
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def setup_failed(self) -> bool:
        return self.status == "SETUP_FAILED"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def worker_died(self) -> bool:
        """Whether the worker subprocess that runs setup() has died while the server waits
        for it: coglet then stays STARTING for good (a worker that cannot import coglet, for
        example, when the `python` on PATH is not this environment's)."""
        try:
            children = psutil.Process(self.process.pid).children()
            alive = [c for c in children if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return False
        # a worker reaped leaves no child: after a while (slow on a loaded machine), dead
        return not alive and (bool(children) or time.monotonic() - self.started > 30)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, Any]:
        """Send one request; return (status, decoded JSON or text). HTTP errors are returned."""
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"} | (headers or {})
        req = urllib.request.Request(self.url + path, data, all_headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _decode(error.read())

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        return self.request("GET", path, timeout=timeout)

    def post(
        self,
        path: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, Any]:
        return self.request("POST", path, json, headers, timeout)

    def put(
        self,
        path: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, Any]:
        return self.request("PUT", path, json, headers, timeout)

    def health(self) -> str:
        """The `status` of GET /health-check (STARTING, READY, BUSY, SETUP_FAILED, ...)."""
        _, body = self.get("/health-check", timeout=5.0)
        return body["status"] if isinstance(body, dict) else "UNKNOWN"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> str:
        """Poll until READY (idle), SETUP_FAILED or DEFUNCT; return that status.

        BUSY (a response just finished, or a request is running) keeps polling.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"cog server exited ({self.process.returncode})\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                self.status = self.health()
                if self.status in TERMINAL_STATUSES:
                    return self.status
            if self.status == "STARTING" and self.worker_died():
                raise RuntimeError(f"{WORKER_DIED}\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"cog server not ready after {timeout:.0f} s\n{self.log_tail()}")

    def stream_prediction(
        self,
        input: dict[str, Any],
        timeout: float = 60.0,
    ) -> list[SseEvent]:
        """POST /predictions as server-sent events; return every event up to `completed`.

        Waits for the server to be idle again before returning: a request sent right after
        `completed` can otherwise get 409 "At capacity".
        """
        body = json.dumps({"input": input}).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        req = urllib.request.Request(self.url + "/predictions", body, headers, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as response:
            content_type = response.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):
                raise AssertionError(f"not an event stream: {content_type!r}")
            events = list(_read_events(line.decode() for line in response))
        self.wait_ready()  # the slot is released just after `completed`: 409 until then
        return events

    def shutdown(self, timeout: float = 10.0) -> None:
        """POST /shutdown, wait, then kill the process group if it is still running."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.post("/shutdown", timeout=5.0)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None:
            return "(the server's output is above)"
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _read_events(lines: Iterator[str]) -> Iterator[SseEvent]:
    """Parse `event:`/`data:` blocks; comments (`: keep-alive`) are skipped."""
    event, data = "message", []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line.startswith(":"):
            continue
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            continue
        if data:
            yield SseEvent(event, _decode("\n".join(data).encode()))
            if event == "completed":
                return
        event, data = "message", []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _refs(project_dir: Path, mode: str) -> tuple[str | None, str | None]:
    """(predict, train) references, as `cog build` would take them from cog.yaml.

    The mode being started falls back to the default reference; the other mode is left out
    while its file does not exist yet (`cog build` would fail there instead).
    """
    refs = dict(zip(("predict", "train"), cog_yaml_refs(project_dir), strict=True))
    refs[mode] = refs[mode] or DEFAULT_REFS[mode]
    for name, ref in refs.items():
        if name != mode and ref and not (project_dir / ref.partition(":")[0]).is_file():
            refs[name] = None
    return refs["predict"], refs["train"]


def _server_env(port: int, mode: str, ref: str, extra: dict[str, str] | None) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env |= {
        "PORT": str(port),
        STUB_VARIABLES[mode]: ref,
        "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    return env | (extra or {})


def _command(mode: str, host: str = "127.0.0.1") -> list[str]:
    command = [sys.executable, "-m", "cog.server.http", "--host", host]
    return command + (["--x-mode", "train"] if mode == "train" else [])


def start_server(
    project_dir: Path,
    mode: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    output: int | None = None,
    host: str = "127.0.0.1",
) -> CogServer:
    """Write the schema and start the server in `project_dir`, without waiting for it.

    The schema covers cog.yaml's `predict` and `train` (one file serves both modes), or the
    default reference of `mode` without cog.yaml. `env` is added to the server's environment
    (e.g. `COG_WEIGHTS`). `output`: a file descriptor for the server's output (None: this
    process's stdout).
    """
    if mode not in DEFAULT_REFS:
        raise ValueError(f"mode must be 'predict' or 'train', not {mode!r}")
    project_dir = Path(project_dir)
    predict_ref, train_ref = _refs(project_dir, mode)
    write_openapi_schema(project_dir, predict_ref, train_ref)
    ref = predict_ref if mode == "predict" else train_ref
    assert ref is not None
    port = port or free_port()
    process = subprocess.Popen(
        _command(mode, host),
        cwd=project_dir,
        env=_server_env(port, mode, ref, env),
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,
    )
    return CogServer(process, port, None)


@contextlib.contextmanager
def cog_server(
    project_dir: Path, mode: str, env: dict[str, str] | None = None
) -> Iterator[CogServer]:
    """Start the server (see `start_server`) on a free 127.0.0.1 port with its output in a
    log file, wait for it, shut it down after. The server is yielded once health reads READY
    or SETUP_FAILED (see `.setup_failed`); the log is deleted when the block exits cleanly.
    """
    log_fd, log_name = tempfile.mkstemp(prefix=f"cog-{mode}-", suffix=".log")
    with os.fdopen(log_fd, "wb") as log:
        server = start_server(project_dir, mode, env, output=log.fileno())
    server.log_path = Path(log_name)
    try:
        if server.wait_ready() == "DEFUNCT":
            raise RuntimeError(f"cog server is DEFUNCT\n{server.log_tail()}")
        yield server
    finally:
        server.shutdown()
    server.log_path.unlink()  # kept (and named in errors) only when something failed


@contextlib.contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook URL on 127.0.0.1 and the list of JSON bodies posted to it."""
    received: list[dict[str, Any]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with loopback_server(Receiver) as url:
        yield f"{url}/hook", received


@contextlib.contextmanager
def loopback_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on a free 127.0.0.1 port, in a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
