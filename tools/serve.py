"""Cog's HTTP server on this checkout, in the foreground: what `make serve` and
`make serve-train` run.

It does what starting the container does: writes `.cog/openapi_schema.json` (the `cog build`
step: without it Cog validates nothing and refuses server-sent events), puts this
environment's `bin` first on PATH (Cog starts its worker with the `python` found there), and
starts `python -m cog.server.http`. BASE_MODEL and COG_WEIGHTS come from the environment. If
the worker dies before setup, or setup fails, it says so and exits instead of leaving a
server that answers STARTING or 503 for good.
"""

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from tools.cog_server import start_server

PROJECT_DIR = Path(__file__).resolve().parent.parent
SETUP_TIMEOUT_S = 3600.0  # a 7B base loads in minutes; a dead worker is noticed at once
EXAMPLES = {
    "predict": (
        "curl -sN localhost:{port}/predictions -H 'Accept: text/event-stream' "
        "-H 'Content-Type: application/json' "
        '-d \'{{"input": {{"prompt": "What is the capital of Zorbia?"}}}}\''
    ),
    "train": (
        "curl -s localhost:{port}/trainings -H 'Content-Type: application/json' "
        '-d \'{{"input": {{"train_data": "\'$PWD\'/demo-output/facts.jsonl"}}}}\''
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["predict", "train"])
    parser.add_argument("--port", type=int, default=5002)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    args = parser.parse_args()
    problem = missing_inputs(os.environ)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.mode == "train" and (note := drop_prediction_slots(os.environ)):
        print(note, file=sys.stderr)
    server = start_server(PROJECT_DIR, args.mode, port=args.port, host=args.host)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    try:
        status = server.wait_ready(timeout=SETUP_TIMEOUT_S)
        if status != "READY":
            print(f"\nsetup failed ({status}): the reason is in the log above", file=sys.stderr)
            return 1
        print(
            f"\n{args.mode} server ready on http://{args.host}:{args.port} "
            f"(Ctrl-C to stop). Try, from another terminal:\n  "
            + EXAMPLES[args.mode].format(port=args.port),
            flush=True,
        )
        server.process.wait()
        return 0
    except RuntimeError as error:  # the worker died before setup
        print(f"\n{error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(Exception):
            server.shutdown()


def drop_prediction_slots(env: os._Environ | dict[str, str]) -> str | None:
    """The train server takes one training at a time: Cog fails the setup of a synchronous
    train() with more than one slot, so a COG_MAX_CONCURRENCY meant for predictions (an
    exported one) is not passed to it."""
    value = env.get("COG_MAX_CONCURRENCY", "").strip()
    if value in ("", "1"):
        return None
    del env["COG_MAX_CONCURRENCY"]
    return f"COG_MAX_CONCURRENCY={value} is for the prediction server; the train server runs one"


def missing_inputs(env: os._Environ | dict[str, str]) -> str | None:
    """A clear word for a local BASE_MODEL or COG_WEIGHTS path that is not there (the
    demo's, before `make demo` has run)."""
    for name in ("BASE_MODEL", "COG_WEIGHTS"):
        value = env.get(name, "")
        remote = value.startswith(("http://", "https://", "data:"))
        hub_id = value.count("/") == 1 and not value.startswith((".", "/", "demo-output/"))
        if value and not remote and not hub_id and not Path(value).exists():
            return (
                f"{name}={value}: no such file or folder. `make demo` creates the demo's tiny "
                f"model and weights in demo-output/; or set {name} to yours "
                f"(make serve BASE_MODEL=... WEIGHTS=...)"
            )
    return None


if __name__ == "__main__":
    sys.exit(main())
