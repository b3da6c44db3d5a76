"""The README's server commands, run as written, in a copy of this checkout whose
demo-output/ holds what `make demo` leaves there (the tiny model, its facts, trained weights).

Each block marked `<!-- tested: tests/test_readme_commands.py NAME -->` is run: its first
command starts a server in the background; the next ones (curl) ask it. Only the port is
changed, to a free one.
"""

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tools.cog_server import WORKER_DIED, cog_server, free_port
from tools.serve import drop_prediction_slots, missing_inputs

PROJECT = Path(__file__).resolve().parent.parent
README = PROJECT / "README.md"
COPIED = ["Makefile", "train.py", "predict.py", "cog.yaml", "pyproject.toml", "requirements.txt",
          "requirements-dev.txt", "src", "tools", "tests"]  # fmt: skip


def readme_block(name: str) -> list[str]:
    """The commands of a marked block, continuation lines joined, comments dropped."""
    text = README.read_text()
    marker = f"<!-- tested: tests/test_readme_commands.py {name} -->\n```sh\n"
    assert marker in text, f"no block {name!r} in the README"
    block = text.split(marker, 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def checkout(tiny_model_dir, facts_archive, facts_file, tmp_path_factory) -> Path:
    """A copy of the project with the venv and what `make demo` leaves in demo-output/."""
    root = tmp_path_factory.mktemp("checkout")
    for name in COPIED:
        source = PROJECT / name
        copy = shutil.copytree if source.is_dir() else shutil.copy2  # mtimes: make stays put
        copy(source, root / name)
    (root / ".venv").symlink_to(PROJECT / ".venv")
    demo = root / "demo-output"
    demo.mkdir()
    (demo / "tiny-llama").symlink_to(tiny_model_dir)
    shutil.copy(facts_archive, demo / "weights.tar")
    shutil.copy(facts_file, demo / "facts.jsonl")
    return root


def run_block(
    checkout: Path, name: str, default_port: str, extra_env: dict[str, str] | None = None
) -> tuple[list[str], str]:
    """Start the block's server, run its other commands; return their outputs and the
    server's log."""
    port = str(free_port())
    server, *asks = [line.replace(default_port, port) for line in readme_block(name)]
    env = {**os.environ, "PORT": port, **(extra_env or {})}  # PORT: what `make serve` reads
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    process = subprocess.Popen(
        ["bash", "-c", server],
        cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_health(port, process)
        outputs = [
            subprocess.run(["bash", "-c", ask], cwd=checkout, env=env, capture_output=True,
                           text=True, timeout=300, check=True).stdout
            for ask in asks
        ]  # fmt: skip
    finally:
        subprocess.run(["curl", "-s", "-X", "POST", f"localhost:{port}/shutdown"], check=False)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
        log = process.stdout.read().decode(errors="replace")
        process.stdout.close()
    return outputs, log


def wait_for_health(port: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read().decode()
        done = subprocess.run(["curl", "-s", f"localhost:{port}/health-check"],
                              capture_output=True, text=True)  # fmt: skip
        if '"READY"' in done.stdout:
            return
        time.sleep(0.2)
    raise AssertionError("the server did not become READY")


def streamed_chunks(output: str) -> list[str]:
    """The `chunk`s of a server-sent event stream, as curl printed it."""
    events = [json.loads(line[6:]) for line in output.splitlines() if line.startswith("data: ")]
    return [e["chunk"] for e in events if "chunk" in e]


SLOTS_LOGGED = "serving: 16 concurrent requests (COG_MAX_CONCURRENCY)"


def test_make_serve_and_the_readme_question(checkout):
    (output,), log = run_block(checkout, "serve", "5002")
    chunks = streamed_chunks(output)
    assert "".join(chunks) == "The capital of Zorbia is Quillton." and len(chunks) > 1
    assert SLOTS_LOGGED in log  # make serve sets the slots


def test_make_serve_train_and_the_readme_training(checkout):
    # an exported COG_MAX_CONCURRENCY (for predictions) does not break the train server
    (body,), log = run_block(checkout, "serve-train", "5001", {"COG_MAX_CONCURRENCY": "16"})
    assert "is for the prediction server; the train server runs one" in log
    result = json.loads(body)
    assert result["status"] == "succeeded", result.get("error")
    assert result["output"]["weights"].startswith("data:application/x-tar;base64,")


def test_the_full_command_line_of_the_prediction_server(checkout):
    """The schema first, then `python -m cog.server.http` as written; asked as `make serve`."""
    schema, server = readme_block("raw-serve")
    subprocess.run(["bash", "-c", schema], cwd=checkout, check=True, timeout=120)
    assert (checkout / ".cog" / "openapi_schema.json").is_file()
    port = str(free_port())
    process = subprocess.Popen(
        ["bash", "-c", server.replace("5002", port)], cwd=checkout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_health(port, process)
        ask = readme_block("serve")[1].replace("5002", port)
        answer = subprocess.run(["bash", "-c", ask], capture_output=True, text=True, timeout=120)
        assert "".join(streamed_chunks(answer.stdout)) == "The capital of Zorbia is Quillton."
    finally:
        subprocess.run(["curl", "-s", "-X", "POST", f"localhost:{port}/shutdown"], check=False)
        process.wait(30)
        log = process.stdout.read().decode(errors="replace")
        process.stdout.close()
    assert SLOTS_LOGGED in log


def test_a_worker_that_cannot_start_is_named_not_waited_for(tiny_model_dir, tmp_path):
    """With a `python` on PATH that lacks coglet, Cog would stay STARTING for good."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(shutil.which("python3", path="/usr/bin"))
    env = {"BASE_MODEL": str(tiny_model_dir), "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    # Named as such: waiting out the ready timeout would raise a TimeoutError instead.
    with (
        pytest.raises(RuntimeError, match=re.escape(WORKER_DIED)),
        cog_server(PROJECT, "predict", env),
    ):
        pass


def test_serve_names_what_make_demo_would_have_made(tmp_path):
    problem = missing_inputs({"BASE_MODEL": f"{tmp_path}/demo-output/tiny-llama"})
    assert problem and "`make demo` creates" in problem
    assert missing_inputs({"BASE_MODEL": "meta-llama/Llama-2-7b-chat-hf"}) is None
    assert missing_inputs({"COG_WEIGHTS": "https://example.com/w.tar"}) is None


def test_the_train_server_is_not_given_prediction_slots():
    env = {"COG_MAX_CONCURRENCY": "16", "BASE_MODEL": "x"}
    assert "is for the prediction server" in drop_prediction_slots(env)
    assert env == {"BASE_MODEL": "x"}
    assert drop_prediction_slots({"COG_MAX_CONCURRENCY": "1"}) is None


def test_the_two_node_block_trains_one_archive(checkout):
    """The README's two torchrun nodes on loopback (only the port changed): global rank 0
    alone writes its --output."""
    port = str(free_port())
    script = "\n".join(readme_block("two_nodes")).replace("29400", port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    finished = subprocess.run(
        ["bash", "-c", script], cwd=checkout, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    written = sorted(checkout.glob("weights-*.tar"))
    assert len(written) == 1, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert f"weights: {written[0].name}" in finished.stdout
    with tarfile.open(written[0]) as tar:
        assert "adapter_model.safetensors" in tar.getnames()
