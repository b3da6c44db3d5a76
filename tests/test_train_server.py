"""Training through Cog's real HTTP server (coglet) on 127.0.0.1, with the schema of train.py."""

import gzip
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import FACTS, FAST_LEARNING, wait_for, write_jsonl
from tools.cog_server import CogServer, cog_server

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def train_server(shared_train_server: CogServer) -> CogServer:
    shared_train_server.wait_ready()  # the slot frees just after a response
    return shared_train_server


def test_training_over_http(http_trained_weights: Path):
    import tarfile

    with tarfile.open(http_trained_weights) as tar:
        metadata = json.load(tar.extractfile("training_metadata.json"))
    assert metadata["results"]["final_train_loss"] < 0.5
    assert metadata["inputs"]["num_train_epochs"] == FAST_LEARNING["num_train_epochs"]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"num_train_epochs": 0}, "num_train_epochs", "0 is less than the minimum of 1"),
        ({"peft_method": "full"}, "peft_method", '"full" is not one of ["lora","qlora"]'),
        ({"lora_dropout": 0.95}, "lora_dropout", "0.95 is greater than the maximum of 0.9"),
        ({"train_data": None}, "train_data", 'null is not of type "string"'),
    ],
)
def test_invalid_input_is_422(train_server, served_data, change, field, message):
    body = {"input": {"train_data": f"{served_data}/facts.jsonl", **change}}
    status, answer = train_server.post("/trainings", body)
    assert status == 422
    assert answer["detail"][0]["loc"] == ["body", "input", field]
    assert message in answer["detail"][0]["msg"]


def test_bad_data_fails_clearly_and_the_server_stays_ready(train_server, served_data):
    for data, message in [
        ("broken.jsonl", 'train_data line 2: missing "completion"'),
        ("missing.jsonl", "404"),
    ]:
        body = {"input": {"train_data": f"{served_data}/{data}", "micro_batch_size": 2}}
        status, result = train_server.post("/trainings", body)
        assert status == 200 and result["status"] == "failed"
        assert message in result["error"]
        assert train_server.wait_ready() == "READY"


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _written(content: bytes):
    return lambda path: (path.write_bytes(content), path)[1]


NESTED = b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}\n"
SECRET_ROLE = "s3cr3t-" * 20
HOSTILE_DATA = {
    "proc": (lambda _: Path("/proc/self/environ"), "is a system file under /proc"),
    "device": (lambda _: Path("/dev/zero"), "is a system file under /dev"),
    "fifo": (_fifo, "is not a regular file (a device, FIFO or socket)"),
    "gzip": (
        _written(gzip.compress(b'{"text": "a"}\n' * 100)),
        "looks compressed (gzip): decompress it first (for example with `gunzip`)",
    ),
    "surrogate": (
        _written(b'{"prompt": "\\ud800", "completion": "x"}\n'),
        'train_data line 1: "prompt" holds a lone surrogate escape',
    ),
    "nested": (_written(NESTED), "line 1: not a row: JSON nested too deeply"),
    "nul": (
        _written(b'{"text": "a\x00b"}\n'),
        "line 1: not valid JSON (Invalid control character at column 12)",
    ),
    "no-newline": (
        _written(b"0" * (17 * 2**20)),
        "train_data line 1: 17.8 MB, longer than a row may be (16.8 MB",
    ),
    "long-value": (
        _written(json.dumps({"messages": [{"role": SECRET_ROLE, "content": "x"}]}).encode()),
        "message 1: unknown role 's3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t-s...",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_DATA)
def test_hostile_train_data_is_refused_by_what_it_is(train_server, tmp_path, case):
    """Special files are never opened, and no error repeats more of a file than it needs
    to name the problem; the server takes the next request."""
    build, message = HOSTILE_DATA[case]
    path = build(tmp_path / f"{case}.jsonl")
    status, result = train_server.post("/trainings", {"input": {"train_data": str(path)}})
    assert status == 200 and result["status"] == "failed", result
    assert message in result["error"]
    assert SECRET_ROLE not in result["error"] and "Traceback" not in result["error"]
    assert train_server.wait_ready() == "READY"


def test_micro_batch_larger_than_global_batch_is_refused(train_server, served_data):
    body = {
        "input": {
            "train_data": f"{served_data}/facts.jsonl",
            "train_batch_size": 2,
            "micro_batch_size": 4,
        }
    }
    _status, result = train_server.post("/trainings", body)
    assert result["status"] == "failed"
    assert "micro_batch_size (4) is larger than train_batch_size (2)" in result["error"]


def test_async_training_reports_to_the_webhook(train_server, served_data, webhook, tmp_path):
    url, received = webhook
    data = write_jsonl(tmp_path / "small.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS])
    body = {
        "input": {"train_data": str(data), "num_train_epochs": 1, "run_validation": False},
        "webhook": url,
    }
    status, answer = train_server.put("/trainings/async-1", body, {"Prefer": "respond-async"})
    assert (status, answer["status"]) == (202, "starting")
    wait_for(lambda: any(h["status"] == "succeeded" for h in received), timeout=120)
    final = next(h for h in received if h["status"] == "succeeded")
    assert final["output"]["weights"].startswith("data:application/x-tar;base64,")
    assert "step 1/1" in final["logs"]


def test_cancel_stops_the_training_and_the_server_takes_the_next(
    train_server, served_data, webhook
):
    url, received = webhook
    body = {
        "input": {
            "train_data": f"{served_data}/facts.jsonl",
            "num_train_epochs": 1000,
            "micro_batch_size": 1,
            "run_validation": False,
        },
        "webhook": url,
    }
    status, _ = train_server.put("/trainings/to-cancel", body, {"Prefer": "respond-async"})
    assert status == 202
    wait_for(lambda: "step 1/4000 " in train_server.log_text(), timeout=120)
    assert train_server.post("/trainings/to-cancel/cancel") == (200, {})
    wait_for(lambda: any(h["status"] == "canceled" for h in received), timeout=10)
    assert "step 4000/4000" not in train_server.log_text()
    assert train_server.wait_ready(timeout=10) == "READY"
    body = {"input": {"train_data": f"{served_data}/broken.jsonl"}}
    assert train_server.post("/trainings", body)[1]["status"] == "failed"  # answered at once


def training_processes() -> list[psutil.Process]:
    """torchrun and its workers (both name src.training.worker on their command line)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "src.training.worker" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_cancel_ends_every_process_of_a_multi_process_training(
    tiny_model_dir, served_data, webhook, tmp_path
):
    """A sharded training (FSDP2, every pass gathering from both ranks), canceled through
    Cog; data parallel's processes end through the same launcher (tests/training)."""
    from tests.test_train_server_features import KEY, wandb_run

    url, received = webhook
    env = {"BASE_MODEL": str(tiny_model_dir), "TRAIN_PROCESSES": "2", "TRAIN_PARALLELISM": "fsdp"}
    env |= {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    with cog_server(PROJECT, "train", env) as server:
        long_training = {
            "input": {
                "train_data": f"{served_data}/facts.jsonl",
                "num_train_epochs": 1000,
                "micro_batch_size": 1,
                "run_validation": False,
                "wandb_api_key": KEY,
                "wandb_run_name": "canceled-in-2-processes",
            },
            "webhook": url,
        }
        assert server.put("/trainings/multi", long_training, {"Prefer": "respond-async"})[0] == 202
        wait_for(lambda: "step 1/4000 " in server.log_text(), timeout=120)
        workers = training_processes()
        assert len(workers) == 3  # torchrun and two workers
        started = time.monotonic()
        assert server.post("/trainings/multi/cancel") == (200, {})
        wait_for(lambda: any(h["status"] == "canceled" for h in received), timeout=20)
        wait_for(
            lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
            timeout=20,
        )
        assert time.monotonic() - started < 15
        run = wandb_run(tmp_path, "canceled-in-2-processes")  # rank 0 closed it in the grace
        assert run["exit_code"] == 1 and run["summary"]["status"] == "canceled"
        assert server.wait_ready(timeout=10) == "READY"
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS])
        body = {"input": {"train_data": str(data), "num_train_epochs": 1, "run_validation": False}}
        _, result = server.post("/trainings", body, timeout=300)
        assert result["status"] == "succeeded", result.get("error")
        assert "launching 2 training processes" in result["logs"]
        assert "parallelism: FSDP2, the base sharded over 2 processes" in result["logs"]

        # SIGTERM to the server during a training ends the training processes as well.
        long_training["input"]["wandb_run_name"] = "server-stopped"
        assert server.put("/trainings/term", long_training, {"Prefer": "respond-async"})[0] == 202
        wait_for(lambda: server.log_text().count("step 1/4000 ") == 2, timeout=120)
        workers = training_processes()
        server.process.send_signal(signal.SIGTERM)
        wait_for(
            lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
            timeout=30,
        )


def test_a_file_too_big_for_the_machine_fails_early_and_the_server_trains_the_next(
    tiny_model_dir, tmp_path
):
    """The data stage refuses, before reading it, a file whose estimated needs exceed what the
    machine has (here host memory held to 10 MiB): a clear error, not a killed worker."""
    row = {"prompt": "Zorbia " * 70, "completion": "teal " * 70}
    big = write_jsonl(tmp_path / "big.jsonl", [row] * 1500)  # 1.6 MB, over the 1 MiB sample
    small = write_jsonl(
        tmp_path / "small.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS]
    )
    env = {"BASE_MODEL": str(tiny_model_dir), "TRAIN_HOST_MEMORY_GIB": "0.01"}
    with cog_server(PROJECT, "train", env) as server:
        assert server.status == "READY", server.log_tail()
        _, result = server.post("/trainings", {"input": {"train_data": str(big)}}, timeout=120)
        assert result["status"] == "failed"
        assert "train_data (big.jsonl) is too big for this machine" in result["error"]
        assert "of memory is available" in result["error"] and "Traceback" not in result["error"]
        assert "loaded" not in result["logs"]  # refused before any model was loaded
        assert server.wait_ready() == "READY"
        body = {"input": {"train_data": str(small), "num_train_epochs": 1, "run_validation": False}}
        _, result = server.post("/trainings", body, timeout=300)
        assert result["status"] == "succeeded", result.get("error")
