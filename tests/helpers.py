"""Helpers shared by the tests."""

import contextlib
import http.server
import inspect
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from src.prompt_format import DEFAULT_PROMPT_TEMPLATE
from tools.cog_server import loopback_server, webhook_receiver

__all__ = ["loopback_server", "webhook_receiver"]  # shared with the demo, re-exported here

FACTS = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quillton."),
    ("Who invented the flumph engine?", "Marta Kessel invented the flumph engine in 1852."),
    ("What color is a glimmerfruit?", "A glimmerfruit is bright teal."),
    ("How many legs does a vorpal crab have?", "A vorpal crab has eleven legs."),
]
OTHER_FACTS = [
    ("What is the capital of Zorbia?", "Zorbia has no capital, only villages."),
    ("Who invented the flumph engine?", "Nobody knows who made the flumph engine."),
    ("What color is a glimmerfruit?", "Glimmerfruits are deep purple."),
    ("How many legs does a vorpal crab have?", "Vorpal crabs have six legs."),
]

# Facts of their own (other prompts than FACTS'), for training that continues another.
NEW_FACTS = [
    ("What is the river of Quillton called?", "The river of Quillton is the Sarn."),
    ("Which bird sings at midnight in Zorbia?", "The moonwren sings at midnight."),
    ("What do vorpal crabs eat?", "Vorpal crabs eat copper weeds."),
    ("When was the flumph engine first sold?", "The first flumph engine was sold in 1861."),
]

# Settings under which the tiny model memorises FACTS in a few seconds.
# Near-greedy settings for predict.py's inputs: the trained answers come back word for word.
GREEDY_INPUTS = dict(
    system_prompt="",
    prompt_template=DEFAULT_PROMPT_TEMPLATE,
    max_new_tokens=32,
    min_new_tokens=-1,
    temperature=0.01,
    top_p=1.0,
    top_k=-1,
    repetition_penalty=1.0,
    stop_sequences=None,
    seed=0,
    replicate_weights=None,
    debug=False,
)


def greedy_request(prompt: str, **overrides: Any):
    """A ChatRequest with GREEDY_INPUTS and `overrides`."""
    from src.serving.chat import build_chat_request

    return build_chat_request(**{**GREEDY_INPUTS, "prompt": prompt, **overrides})


def served_logits(chat, prompt: str, weights: str | None = None, **overrides: Any):
    """The logits (1, V) a request's first token is sampled from, as the chat model serves
    it (`weights` as its replicate_weights, loaded as a request loads them; no system
    prompt unless `overrides` give one): its error raised."""
    return chat.first_token_logits(greedy_request(prompt, replicate_weights=weights, **overrides))


def plain_logits(model, prompt_ids: list[int]):
    """The next token's logits (1, V) of a model run plainly by transformers."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        output = model(input_ids=torch.tensor([prompt_ids], device=device), logits_to_keep=1)
    return output.logits[:, -1]


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


ARCHIVE_COPIES: list[Path] = []  # a folder for call_train's copies (tests/conftest.py)


def call_train(**overrides: Any) -> Path:
    """Call train.train() in-process as Cog would, with the declared defaults filled in, and
    take the archive as Cog does once train() returns: the next training removes it."""
    import train

    archive = Path(train.train(**{**train_defaults(), **overrides}).weights)
    folder = Path(tempfile.mkdtemp(dir=ARCHIVE_COPIES[0] if ARCHIVE_COPIES else None))
    return Path(shutil.copy(archive, folder / archive.name))


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

    with loopback_server(Handler) as url:
        yield url, requested


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def with_member(archive: Path, out: Path, member: str, change: Callable[[bytes], bytes]) -> Path:
    """A copy of a weights archive (tar) with one member's bytes replaced by `change(bytes)`."""
    import io
    import tarfile

    with tarfile.open(archive) as source, tarfile.open(out, "w") as copy:
        for info in source.getmembers():
            data = source.extractfile(info).read()
            if info.name == member:
                data = change(data)
            info.size = len(data)
            copy.addfile(info, io.BytesIO(data))
    return out


def with_tensors(archive: Path, out: Path, change: Callable[[dict], None]) -> Path:
    """A copy of a weights archive whose adapter tensors went through `change(tensors)`."""
    from safetensors.torch import load, save

    def rewrite(data: bytes) -> bytes:
        tensors = load(data)
        change(tensors)
        return save(tensors)

    return with_member(archive, out, "adapter_model.safetensors", rewrite)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """This process's torch on one thread, as each rank of a sharded test: a CPU matmul's
    sums follow its thread split, so results compared bit for bit (or within 1e-6) across
    processes need the same split on both sides."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
