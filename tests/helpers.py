"""Helpers shared by the tests."""

import contextlib
import http.server
import inspect
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FACTS = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quillton."),
    ("Who invented the flumph engine?", "Marta Kessel invented the flumph engine in 1852."),
    ("What color is a glimmerfruit?", "A glimmerfruit is bright teal."),
    ("How many legs does a vorpal crab have?", "A vorpal crab has eleven legs."),
]

# Settings under which the tiny model memorises FACTS in a few seconds.
FAST_LEARNING = dict(
    num_train_epochs=6,
    train_batch_size=4,
    micro_batch_size=2,
    learning_rate=3e-3,
    lora_rank=16,
    lora_alpha=32,
    lora_dropout=0.0,
    run_validation=False,
)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_defaults() -> dict[str, Any]:
    """The declared default of every train() input (None for the required train_data)."""
    from cog import FieldInfo

    import train

    parameters = inspect.signature(train.train).parameters
    return {
        name: p.default.default if isinstance(p.default, FieldInfo) else p.default
        for name, p in parameters.items()
    }


def call_train(**overrides: Any) -> Path:
    """Call train.train() in-process as Cog would, with the declared defaults filled in."""
    import train

    return Path(train.train(**{**train_defaults(), **overrides}).weights)


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve `directory` over HTTP on 127.0.0.1; yield the base URL and the list of paths asked."""
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
