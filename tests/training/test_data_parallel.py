"""Data parallelism on CPU: torchrun workers with the gloo backend, launched from train()."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import psutil
import pytest
import torch
from safetensors.torch import load

from src.errors import UserInputError
from tests.helpers import FACTS, call_train, wait_for, write_jsonl

# Two processes need two GPUs, or none (gloo on the CPU): not one.
pytestmark = pytest.mark.skipif(
    0 < torch.cuda.device_count() < 2, reason="data-parallel tests need 2 GPUs or a CPU"
)

# 1 process x 4 accumulation steps against 2 processes x 2 accumulation steps.
SETTINGS = dict(
    num_train_epochs=2,
    train_batch_size=4,
    micro_batch_size=1,
    learning_rate=3e-3,
    lora_dropout=0.0,
    validation_prompt=FACTS[0][0],
)


def results(archive) -> tuple[dict, dict[str, torch.Tensor]]:
    with tarfile.open(archive) as tar:
        metadata = json.load(tar.extractfile("training_metadata.json"))
        weights = load(tar.extractfile("adapter_model.safetensors").read())
    return metadata, weights


@pytest.fixture(scope="module")
def one_and_two_processes(tiny_model_dir, facts_file):
    """Weights archive and logs of the same training in 1 and in 2 processes."""
    runs = {}
    for processes in (1, 2):
        logs = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(logs):
            patch.setenv("BASE_MODEL", str(tiny_model_dir))
            patch.setenv("TRAIN_PROCESSES", str(processes))
            archive = call_train(train_data=str(facts_file), **SETTINGS)
        runs[processes] = archive, logs.getvalue()
    return {processes: archive for processes, (archive, _) in runs.items()}, {
        processes: logs for processes, (_, logs) in runs.items()
    }


def test_two_processes_train_like_one(one_and_two_processes):
    archives, _ = one_and_two_processes
    one, one_weights = results(archives[1])
    two, two_weights = results(archives[2])
    losses_one = [loss for _, loss in one["results"]["train_losses"]]
    losses_two = [loss for _, loss in two["results"]["train_losses"]]
    assert len(losses_one) == len(losses_two) == 2 * 4  # 13 train rows, 4 per step
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    assert two["results"]["tokens_trained"] == one["results"]["tokens_trained"]
    for name, tensor in one_weights.items():
        error = (tensor - two_weights[name]).norm() / tensor.norm()
        assert error < 1e-3, name


def test_rank_zero_alone_logs_and_validates(one_and_two_processes):
    archives, logs = one_and_two_processes
    assert "launching 2 training processes" in logs[2]
    for processes in (1, 2):
        # Each progress line, validation and answer once: a second rank would double them.
        assert logs[processes].count("step 1/8 |") == 1
        assert logs[processes].count("step 8/8 |") == 1
        assert logs[processes].count("validation: epoch") == 2
        assert logs[processes].count("model answer:") == 2
        metadata, _ = results(archives[processes])
        assert len(metadata["results"]["validation_losses"]) == 2
        assert len(metadata["results"]["validation_answers"]) == 2


def test_a_worker_error_reaches_the_user_with_its_traceback(
    tiny_model_dir, facts_file, tmp_path, monkeypatch
):
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setenv("BASE_MODEL", str(broken))
    monkeypatch.setenv("TRAIN_PROCESSES", "2")
    with pytest.raises(RuntimeError) as error:
        call_train(train_data=str(facts_file), num_train_epochs=1)
    message = str(error.value)
    assert "training process" in message and "failed" in message
    assert "Traceback (most recent call last)" in message and "load_base_model" in message


def test_data_errors_are_raised_before_any_worker_starts(base_model_env, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIN_PROCESSES", "2")
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(UserInputError, match='line 1: missing "completion"'):
        call_train(train_data=str(data))


def test_workers_end_when_the_launcher_dies(tiny_model_dir, facts_file):
    script = (
        "from tests.helpers import call_train\n"
        f"call_train(train_data={str(facts_file)!r}, num_train_epochs=1000, micro_batch_size=1)\n"
    )
    env = {
        **__import__("os").environ,
        "BASE_MODEL": str(tiny_model_dir),
        "TRAIN_PROCESSES": "2",
        "PYTHONUNBUFFERED": "1",
    }
    launcher = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        for line in launcher.stdout:
            if line.startswith("step 1/"):
                break
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) >= 3  # torchrun and two workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        wait_for(
            lambda: (
                not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
            ),
            timeout=20,
        )
    finally:
        launcher.kill()


def test_more_processes_than_gpus_is_refused_before_anything_starts(monkeypatch):
    from src.training.launcher import data_parallel_processes

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("TRAIN_PROCESSES", "4")
    with pytest.raises(UserInputError, match="TRAIN_PROCESSES=4 asks for more processes than"):
        data_parallel_processes(rows_per_step=8)


def test_no_more_processes_than_rows_per_step(monkeypatch, capsys):
    from src.training.launcher import data_parallel_processes

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("TRAIN_PROCESSES", raising=False)
    assert data_parallel_processes(rows_per_step=8) == 8
    assert data_parallel_processes(rows_per_step=4) == 4  # the defaults on 8 GPUs
    assert "4 row(s) per optimizer step, so 4 process(es) instead of 8" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert data_parallel_processes(rows_per_step=4) == 1  # a CPU


def test_rank_zero_decides_the_epochs_and_reports_for_every_rank(
    tiny_model_dir, tmp_path, monkeypatch
):
    """keep_best_epoch and early stopping in 2 processes: rank 0 decides, rank 1 follows (no
    rank is left waiting), as 1 process decides; rank 0 alone reports to Weights & Biases,
    with the key in its environment and never in the job folder."""
    from cog import Secret

    from src.training import launcher
    from tests.helpers import OTHER_FACTS
    from tests.test_train_server_features import KEY, wandb_run

    pairs = lambda facts: [{"prompt": p, "completion": c} for p, c in facts]  # noqa: E731
    train = write_jsonl(tmp_path / "train.jsonl", pairs(FACTS) * 4)
    validation = write_jsonl(tmp_path / "validation.jsonl", pairs(OTHER_FACTS))
    job_files: list[bytes] = []
    write_job = launcher.write_job

    def keep_job_files(job, *args):
        write_job(job, *args)
        job_files.extend(path.read_bytes() for path in job.rglob("*") if path.is_file())

    monkeypatch.setattr(launcher, "write_job", keep_job_files)
    monkeypatch.setenv("BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    settings = dict(
        SETTINGS, train_data=str(train), validation_data=str(validation), learning_rate=1e-2,
        num_train_epochs=8, keep_best_epoch=True, early_stopping_patience=2,
        wandb_api_key=Secret(KEY),  # as Cog hands a secret over
    )  # fmt: skip
    outcomes = {}
    for processes, parallelism in ((1, "auto"), (2, "ddp"), (2, "fsdp")):
        monkeypatch.setenv("TRAIN_PROCESSES", str(processes))
        monkeypatch.setenv("TRAIN_PARALLELISM", parallelism)
        name = f"ranks-{processes}" + ("-sharded" if parallelism == "fsdp" else "")
        metadata, weights = results(call_train(**settings, wandb_run_name=name))
        outcomes[processes, parallelism] = metadata["results"], weights
    (one, one_weights), (two, two_weights) = outcomes[1, "auto"], outcomes[2, "ddp"]
    sharded, sharded_weights = outcomes[2, "fsdp"]  # the whole adapter kept on rank 0 too
    assert sharded["computed"]["parallelism"] == "fsdp" and two["computed"]["parallelism"] == "ddp"
    assert (sharded["kept_epoch"], sharded["stopped_after_epoch"]) == (
        two["kept_epoch"], two["stopped_after_epoch"],
    )  # fmt: skip
    assert all(torch.equal(sharded_weights[name], t) for name, t in two_weights.items())
    assert one["stopped_after_epoch"] == two["stopped_after_epoch"] == one["best_epoch"] + 2 < 8
    assert one["kept_epoch"] == two["kept_epoch"] == one["best_epoch"] == two["best_epoch"]
    for name, tensor in one_weights.items():  # the same epoch's weights, kept on both
        error = (tensor - two_weights[name]).norm() / tensor.norm()
        assert error < 1e-2, name
    run = wandb_run(tmp_path, "ranks-2")
    assert run["exit_code"] == 0 and run["summary"]["kept_epoch"] == two["kept_epoch"]
    assert len([r for r in run["history"] if "train/loss" in r]) == two["optimizer_steps"]
    assert job_files and not any(KEY.encode() in data for data in job_files)


# --- the base sharded with FSDP2 (TRAIN_PARALLELISM=fsdp), on one machine and on two nodes


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_nodes(
    tmp_path, inputs: dict, envs: list[dict], processes: int = 1
) -> list[subprocess.Popen]:
    """One torchrun agent per environment in `envs`, `processes` each, as on separate
    machines: c10d rendezvous on loopback, each its own --output and log."""
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    for node, env in enumerate(envs):
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(envs)}",
            f"--nproc-per-node={processes}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "-m", "src.training", "--inputs", str(tmp_path / "inputs.json"),
            "--output", str(tmp_path / f"weights-{node}.tar"),
        ]  # fmt: skip
        log = open(tmp_path / f"node-{node}.log", "w")  # noqa: SIM115 - the agent's
        agents.append(
            subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                start_new_session=True,
            )
        )
    return agents


def test_two_nodes_train_as_one_machine(
    tiny_model_dir, facts_file, one_and_two_processes, tmp_path
):
    """`python -m src.training` under two torchrun agents of 2 processes (c10d on
    loopback): the base sharded over each node's 2 and replicated across the nodes (HSDP).
    13 training rows: the last step of each epoch has one row, 3 ranks run passes of zero
    weight; 2 validation rows, 2 ranks validate nothing (lockstep). Each node prepares the
    data in a job folder of its own; global rank 0 alone logs and writes its --output; both
    exit 0; the adapter is data parallelism's (4 ranks sum in another order than 2)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"BASE_MODEL": str(tiny_model_dir), "TRAIN_PARALLELISM": "fsdp", "TMPDIR": str(scratch)}
    inputs = {**SETTINGS, "train_data": str(facts_file)}
    agents = start_nodes(tmp_path, inputs, [env, env], processes=2)
    codes = [agent.wait(timeout=300) for agent in agents]
    logs = [(tmp_path / f"node-{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], logs
    written = sorted(tmp_path.glob("weights-*.tar"))
    assert len(written) == 1  # by global rank 0, on whichever node c10d placed it
    [main_log] = [log for log in logs if "parallelism:" in log]
    assert "sharded over 2 processes and replicated 2x across nodes (HSDP)" in main_log
    assert "(sharded over 2 processes) base parameters" in main_log
    assert f"weights: {written[0]}" in main_log
    assert main_log.count("validation: epoch") == 2 and main_log.count("model answer:") == 2
    assert main_log.count("step 8/8 |") == 1
    sharded, weights = results(written[0])
    assert sharded["results"]["computed"]["parallelism"] == "fsdp"
    archives, _ = one_and_two_processes
    data_parallel, dp_weights = results(archives[2])
    for name, tensor in dp_weights.items():
        error = (weights[name] - tensor).norm() / tensor.norm()
        assert error < 1e-4, name
    losses = [[loss for _, loss in run["results"][key]] for run in (sharded, data_parallel)
              for key in ("train_losses", "validation_losses")]  # fmt: skip
    assert losses[0] == pytest.approx(losses[2], rel=1e-5)
    assert losses[1] == pytest.approx(losses[3], rel=1e-5)
    assert not list(scratch.glob("llama2-*")), "a node left its job folder or an output"


def test_a_failing_node_ends_the_other_with_its_traceback(tiny_model_dir, facts_file, tmp_path):
    """Node 1's tokenizer is broken: its rank fails preparing the data and prints the
    traceback; node 0, waiting for it, fails too, naming node 1, and removes its own job
    folder; both exit non-zero."""
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{")
    inputs = {**SETTINGS, "train_data": str(facts_file)}
    envs = []
    for node, base in enumerate((tiny_model_dir, broken)):
        (tmp_path / f"tmp-{node}").mkdir()
        envs.append({"TRAIN_PARALLELISM": "fsdp", "BASE_MODEL": str(base),
                     "TMPDIR": str(tmp_path / f"tmp-{node}")})  # fmt: skip
    agents = start_nodes(tmp_path, inputs, envs)
    try:
        codes = [agent.wait(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert codes[0] != 0 and codes[1] != 0
    failing = (tmp_path / "node-1.log").read_text()
    assert "Traceback (most recent call last)" in failing and "load_tokenizer" in failing
    assert "node 1 failed to prepare the data" in (tmp_path / "node-0.log").read_text()
    assert not list(tmp_path.glob("weights-*.tar"))
    assert not list(tmp_path.glob("tmp-*/llama2-*")), "a job folder was left behind"


def test_a_hung_node_ends_the_other_within_the_collective_timeout(
    tiny_model_dir, facts_file, tmp_path
):
    """A node that stops answering (SIGSTOP: no socket closes, as when a machine hangs):
    the other's next collective times out (TRAIN_COLLECTIVE_TIMEOUT_S, 60 s by default; 5
    here) and it exits non-zero."""
    import time

    inputs = {**SETTINGS, "train_data": str(facts_file), "num_train_epochs": 1000}
    env = {"BASE_MODEL": str(tiny_model_dir), "TRAIN_PARALLELISM": "fsdp",
           "TRAIN_COLLECTIVE_TIMEOUT_S": "5"}  # fmt: skip
    agents = start_nodes(tmp_path, inputs, [env, env])
    workers: list[list[psutil.Process]] = [[], []]
    try:
        logs = [tmp_path / f"node-{node}.log" for node in (0, 1)]
        wait_for(lambda: any("step 1/" in log.read_text() for log in logs), timeout=120)
        main = next(node for node in (0, 1) if "step 1/" in logs[node].read_text())
        workers = [psutil.Process(a.pid).children(recursive=True) for a in agents]
        for process in workers[1 - main]:
            process.suspend()  # the worker: its agent stays, as a hung machine's would
        stopped = time.monotonic()
        code = agents[main].wait(timeout=90)
        assert time.monotonic() - stopped < 60
    finally:
        for process in [p for node in workers for p in node]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()  # torchrun's workers have sessions of their own
        for agent in agents:
            agent.kill()
            agent.wait()
    assert code != 0
    assert "Timed out waiting 5000ms" in logs[main].read_text()
