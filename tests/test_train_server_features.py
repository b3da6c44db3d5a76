"""Training that builds on itself, through Cog's real train server: continuing from earlier
weights (init_weights), keeping the best epoch, stopping early, and reporting to Weights &
Biases (offline, into a temporary folder: nothing reaches the internet)."""

import base64
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from src.artifact import read_archive
from src.errors import UserInputError
from src.modeling import load_base_model, pick_placement
from src.prompt_format import encode_chat_examples
from src.training.batching import build_rows
from src.training.examples import Examples
from src.training.loop import validation_loss
from tests.conftest import _train
from tests.helpers import (
    FACTS,
    FAST_LEARNING,
    NEW_FACTS,
    OTHER_FACTS,
    call_train,
    wait_for,
    with_tensors,
    write_jsonl,
)
from tests.training.test_run import greedy_answer
from tools.cog_server import CogServer

KEY = "local-test-key-" + "0123456789abcdef" * 2  # a made-up key, 40 characters like wandb's


@pytest.fixture
def train_server(shared_train_server: CogServer) -> CogServer:
    shared_train_server.wait_ready()
    return shared_train_server


def rows(pairs) -> list[dict]:
    return [{"prompt": p, "completion": c} for p, c in pairs]


def train_over_http(server: CogServer, tmp_path: Path, **inputs) -> tuple[dict, Path]:
    """A training through the server; returns its result and its weights archive."""
    _, result = server.post("/trainings", {"input": inputs}, timeout=600)
    assert result["status"] == "succeeded", result.get("error")
    payload = result["output"]["weights"].partition(",")[2]
    archive = tmp_path / f"weights-{len(list(tmp_path.glob('weights-*')))}.tar"
    archive.write_bytes(base64.b64decode(payload))
    return result, archive


def metadata_of(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile("training_metadata.json"))


def trained_model(archive: Path, tiny_model_dir: Path, folder: Path) -> PeftModel:
    adapter = read_archive(archive, folder)
    base = load_base_model(tiny_model_dir, quantize_4bit=False, placement=pick_placement())
    return PeftModel.from_pretrained(base, adapter.folder).eval()


def loss_on(model, tokenizer, pairs) -> float:
    """The token-weighted loss on the answers of `pairs`, as training validates."""
    prompts, answers = map(list, zip(*pairs, strict=True))
    examples = encode_chat_examples(tokenizer, prompts, answers, [None] * len(prompts))
    validation, _ = build_rows(Examples.from_tokenized(examples), False, False, 0)
    return validation_loss(model, validation, 4, model.device)


# --- init_weights ---------------------------------------------------------------------------


def test_continuing_keeps_what_the_earlier_training_learned(
    train_server, facts_archive, tiny_model_dir, tokenizer, tmp_path
):
    """Facts A, then facts B from A's weights: the result answers B, and its loss on A is far
    below that of an adapter trained on B alone from a fresh start."""
    new = write_jsonl(tmp_path / "new.jsonl", rows(NEW_FACTS) * 4)
    result, continued = train_over_http(
        train_server, tmp_path, train_data=str(new), init_weights=str(facts_archive),
        **FAST_LEARNING,
    )  # fmt: skip
    fresh = _train(tiny_model_dir, new)
    assert f"init_weights: starting from {facts_archive}" in result["logs"]
    models = {
        name: trained_model(archive, tiny_model_dir, tmp_path / name)
        for name, archive in (("continued", continued), ("fresh", fresh))
    }
    on_a = {name: loss_on(model, tokenizer, FACTS) for name, model in models.items()}
    on_b = {name: loss_on(model, tokenizer, NEW_FACTS) for name, model in models.items()}
    assert on_a["continued"] < 0.5 * on_a["fresh"], on_a
    assert on_b["continued"] < 0.5, on_b
    for prompt, answer in NEW_FACTS:
        assert greedy_answer(models["continued"], tokenizer, prompt) == answer

    metadata = metadata_of(continued)
    assert metadata["inputs"]["init_weights"] == str(facts_archive)
    [parent] = metadata["lineage"]
    assert parent["weights"] == str(facts_archive) and parent["train_data"] == "facts.jsonl"
    assert parent["lora"]["rank"] == 16 and parent["optimizer_steps"] == 24


def test_the_continued_adapter_s_rank_and_alpha_win(train_server, facts_archive, tmp_path):
    new = write_jsonl(tmp_path / "new.jsonl", rows(NEW_FACTS))
    result, archive = train_over_http(
        train_server, tmp_path, train_data=str(new), init_weights=str(facts_archive),
        num_train_epochs=1, lora_rank=4, lora_alpha=8, run_validation=False,
    )  # fmt: skip
    assert (
        "continuing its adapter of rank 16 and alpha 32 (lora_rank 4 and lora_alpha 8"
        in (result["logs"])
    )
    metadata = metadata_of(archive)
    assert (metadata["lora"]["rank"], metadata["lora"]["alpha"]) == (16, 32)
    assert (metadata["inputs"]["lora_rank"], metadata["inputs"]["lora_alpha"]) == (4, 8)
    with tarfile.open(archive) as tar:
        config = json.load(tar.extractfile("adapter_config.json"))
    assert (config["r"], config["lora_alpha"]) == (16, 32)


def test_weights_of_another_base_are_refused_before_the_data_is_read(
    train_server, facts_archive, tmp_path
):
    other = tmp_path / "other-base.tar"
    with tarfile.open(facts_archive) as source, tarfile.open(other, "w") as out:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name == "training_metadata.json":
                values = json.loads(data)
                values["base_model"]["hidden_size"] = 4096
                data = json.dumps(values).encode()
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    new = write_jsonl(tmp_path / "new.jsonl", rows(NEW_FACTS))
    body = {"input": {"train_data": str(new), "init_weights": str(other)}}
    _, result = train_server.post("/trainings", body, timeout=120)
    assert result["status"] == "failed"
    assert (
        "init_weights" in result["error"] and "differs from this server's base" in result["error"]
    )
    assert "hidden_size" in result["error"] and "train: " not in result["logs"]
    assert train_server.wait_ready() == "READY"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("nan", "lora_B.weight: 1 of its 4096 values are NaN or infinite"),
        ("huge", "lora_A.weight: holds 1e+30, beyond 1e+04 in magnitude"),
        ("shape", "lora_A.weight: shape (16, 255), expected (16, 256)"),
    ],
)
def test_broken_init_weights_are_refused_by_tensor_before_the_data_is_read(
    train_server, facts_archive, tmp_path, bad, message
):
    """Not a training of `loss nan` at every step that returns a NaN adapter."""
    a_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    b_key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"

    def change(tensors):
        if bad == "shape":
            tensors[a_key] = torch.zeros(16, 255)
            return
        key = b_key if bad == "nan" else a_key
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[7] = float("nan") if bad == "nan" else 1e30

    broken = with_tensors(facts_archive, tmp_path / "broken.tar", change)
    new = write_jsonl(tmp_path / "new.jsonl", rows(NEW_FACTS))
    body = {"input": {"train_data": str(new), "init_weights": str(broken)}}
    _, result = train_server.post("/trainings", body, timeout=120)
    assert result["status"] == "failed"
    assert f"init_weights {broken} do not fit" in result["error"]
    assert message in result["error"] and "train: " not in result["logs"]
    assert train_server.wait_ready() == "READY"


def test_a_training_whose_loss_overflows_stops_naming_the_step_and_the_learning_rate(
    base_model_env, facts_file
):
    """learning_rate 1e30 (in-process: the schema caps it at 1, under which the tiny model
    does not overflow): the first update overflows the adapter, the second step's loss is
    NaN; the training fails there instead of returning a broken adapter."""
    with pytest.raises(UserInputError) as error:
        call_train(train_data=str(facts_file), **{**FAST_LEARNING, "learning_rate": 1e30})
    assert (
        "training stopped at optimizer step 2 (epoch 1): the loss is nan, so the adapter would "
        "be broken and none is returned. Lower learning_rate (this step's was 1e+30)"
    ) in str(error.value)


def test_a_non_finite_gradient_norm_stops_the_training_too(base_model_env, facts_file, monkeypatch):
    """A finite loss with gradients that overflowed (as bf16 can): stopped, not applied."""
    real_clip = torch.nn.utils.clip_grad_norm_
    norms = iter([1.0, 2.0, float("inf")])

    def overflow_at_step_3(parameters, max_norm):
        real_clip(parameters, max_norm)
        return torch.tensor(next(norms))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflow_at_step_3)
    with pytest.raises(UserInputError) as error:
        call_train(train_data=str(facts_file), **{**FAST_LEARNING, "num_train_epochs": 2})
    assert "optimizer step 3 (epoch 1): the gradient norm is inf" in str(error.value)


# --- keep_best_epoch and early_stopping_patience ----------------------------------------------


@pytest.fixture(scope="module")
def diverging(tmp_path_factory) -> dict[str, Path]:
    """Training on FACTS, validating on OTHER_FACTS (the same questions, other answers): the
    better the facts are learned, the worse the validation loss, after an early minimum."""
    folder = tmp_path_factory.mktemp("diverging")
    return {
        "train_data": write_jsonl(folder / "train.jsonl", rows(FACTS) * 4),
        "validation_data": write_jsonl(folder / "validation.jsonl", rows(OTHER_FACTS)),
    }


def test_keep_best_epoch_returns_the_epoch_that_validated_best(
    train_server, diverging, tiny_model_dir, tokenizer, tmp_path
):
    result, archive = train_over_http(
        train_server, tmp_path, **{k: str(v) for k, v in diverging.items()},
        **{**FAST_LEARNING, "learning_rate": 1e-2, "run_validation": True}, keep_best_epoch=True,
    )  # fmt: skip
    results = metadata_of(archive)["results"]
    losses = [loss for _, loss in results["validation_losses"]]
    best = int(np.argmin(losses)) + 1
    assert results["epochs_run"] == 6 and len(losses) == 6
    assert results["best_epoch"] == results["kept_epoch"] == best < 6  # not the last epoch
    assert f"epoch {best} is the best so far" in result["logs"]
    assert f"keeping epoch {best}, the best" in result["logs"]
    # The output is that epoch's adapter: its validation loss is the one recorded then.
    model = trained_model(archive, tiny_model_dir, tmp_path / "best")
    assert loss_on(model, tokenizer, OTHER_FACTS) == pytest.approx(losses[best - 1], rel=1e-4)
    assert loss_on(model, tokenizer, OTHER_FACTS) < losses[-1]


def test_early_stopping_ends_training_when_validation_stops_improving(
    train_server, diverging, tmp_path
):
    result, archive = train_over_http(
        train_server, tmp_path, **{k: str(v) for k, v in diverging.items()},
        **{**FAST_LEARNING, "learning_rate": 1e-2, "num_train_epochs": 20, "run_validation": True},
        early_stopping_patience=2,
    )  # fmt: skip
    results = metadata_of(archive)["results"]
    losses = [loss for _, loss in results["validation_losses"]]
    best = int(np.argmin(losses)) + 1
    assert results["stopped_after_epoch"] == results["epochs_run"] == best + 2 < 20
    assert results["optimizer_steps"] == 4 * (best + 2)  # the 4 steps of each epoch run
    assert f"stopping after epoch {best + 2}: no improvement for 2 epoch(s)" in result["logs"]
    assert results["kept_epoch"] is None  # the last epoch's adapter, without keep_best_epoch


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"keep_best_epoch": True, "run_validation": False}, "keep_best_epoch decides on the va"),
        ({"early_stopping_patience": 1}, "there are no validation rows"),
    ],
)
def test_choosing_epochs_without_validation_fails_before_the_model_loads(
    train_server, tmp_path, inputs, message
):
    tiny = write_jsonl(tmp_path / "tiny.jsonl", rows(FACTS[:3]))  # too few rows to hold out
    _, result = train_server.post("/trainings", {"input": {"train_data": str(tiny), **inputs}})
    assert result["status"] == "failed" and message in result["error"]
    assert "loaded" not in result["logs"]
    assert train_server.wait_ready() == "READY"


# --- Weights & Biases ---------------------------------------------------------------------------


def wandb_records(run_file: Path):
    """The records of a wandb run file (wandb's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # the zeros that fill a block
            position += room
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(folder: Path, name: str) -> dict:
    """What a wandb run recorded: its config, history rows, summary and exit code."""
    for run_file in folder.glob("wandb/offline-run-*/run-*.wandb"):
        run = {"history": [], "summary": {}, "config": {}, "exit_code": None, "file": run_file}
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["name"], run["project"] = record.run.display_name, record.run.project
                run["config"] |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "config":
                run["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
            elif kind == "history":
                run["history"].append(
                    {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in record.history.item
                    }
                )
            elif kind == "summary":
                run["summary"] |= {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.summary.update
                }
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        if run.get("name") == name:
            return run
    raise AssertionError(f"no wandb run named {name!r} in {folder}")


def test_a_training_reports_to_weights_and_biases(train_server, wandb_dir, facts_file, tmp_path):
    result, archive = train_over_http(
        train_server, tmp_path, train_data=str(facts_file),
        **{**FAST_LEARNING, "run_validation": True}, num_validation_samples=4,
        validation_prompt="What is the capital of Zorbia?",
        wandb_api_key=KEY, wandb_project="zorbia", wandb_run_name="facts-run",
    )  # fmt: skip
    run = wandb_run(wandb_dir, "facts-run")
    assert run["project"] == "zorbia" and run["exit_code"] == 0
    assert run["config"]["learning_rate"] == FAST_LEARNING["learning_rate"]
    assert run["config"]["lora"]["rank"] == 16 and "wandb_api_key" not in run["config"]
    results = metadata_of(archive)["results"]
    steps = [row for row in run["history"] if "train/loss" in row]
    # Each step at its number, with the loss the training recorded for it (not one off).
    assert [[row["_step"], row["train/loss"]] for row in steps] == results["train_losses"]
    assert len(steps) == results["optimizer_steps"]
    assert all(
        row["train/learning_rate"] > 0 and row["train/tokens_per_second"] > 0 for row in steps
    )
    epochs = [row for row in run["history"] if "validation/loss" in row]
    assert [[row["_step"], row["validation/loss"]] for row in epochs] == results[
        "validation_losses"
    ]
    assert len(epochs) == FAST_LEARNING["num_train_epochs"]
    answers = [row["validation/answer"] for row in run["history"] if "validation/answer" in row]
    assert answers == results["validation_answers"]
    assert run["summary"]["status"] == "finished" and "loss_curve/_type" in run["summary"]
    # The key is nowhere: not in the logs, the weights, or anything wandb wrote.
    assert KEY not in result["logs"] and KEY.encode() not in archive.read_bytes()
    for path in wandb_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_canceled_training_closes_its_run_as_canceled(
    train_server, wandb_dir, facts_file, webhook
):
    url, received = webhook
    body = {
        "input": {
            "train_data": str(facts_file), "num_train_epochs": 999, "micro_batch_size": 1,
            "run_validation": False, "wandb_api_key": KEY, "wandb_run_name": "canceled-run",
        },
        "webhook": url,
    }  # fmt: skip
    assert train_server.put("/trainings/wandb-cancel", body, {"Prefer": "respond-async"})[0] == 202
    wait_for(lambda: "step 1/3996 " in train_server.log_text(), timeout=120)  # its own count
    assert train_server.post("/trainings/wandb-cancel/cancel") == (200, {})
    wait_for(lambda: any(h["status"] == "canceled" for h in received), timeout=20)
    run = wandb_run(wandb_dir, "canceled-run")
    assert run["exit_code"] == 1 and run["summary"]["status"] == "canceled"
    assert train_server.wait_ready(timeout=10) == "READY"


def test_without_a_key_nothing_is_imported(base_model_env, facts_file):
    import subprocess
    import sys

    code = (
        "import sys, train; from tests.helpers import call_train, FAST_LEARNING; "
        f"call_train(train_data={str(facts_file)!r}, num_train_epochs=1, run_validation=False);"
        "print('wandb' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "False"


# --- the same, in-process: what the server tests do not reach ------------------------------


def rewritten(archive: Path, out: Path, member: str, change) -> Path:
    """A copy of a weights archive with one JSON member changed by `change(values)`."""
    with tarfile.open(archive) as source, tarfile.open(out, "w") as copy:
        for info in source.getmembers():
            data = source.extractfile(info).read()
            if info.name == member:
                values = json.loads(data)
                change(values)
                data = json.dumps(values).encode()
            info.size = len(data)
            copy.addfile(info, io.BytesIO(data))
    return out


def test_rslora_is_continued_and_other_lora_variants_are_refused(
    base_model_env, facts_archive, facts_file, tmp_path
):
    from tests.helpers import call_train

    rslora = rewritten(
        facts_archive, tmp_path / "rs.tar", "adapter_config.json",
        lambda values: values.update(use_rslora=True),
    )  # fmt: skip
    archive = call_train(
        train_data=str(facts_file), init_weights=str(rslora), num_train_epochs=1,
        run_validation=False,
    )  # fmt: skip
    with tarfile.open(archive) as tar:
        assert json.load(tar.extractfile("adapter_config.json"))["use_rslora"] is True
    assert metadata_of(archive)["lora"]["use_rslora"] is True
    dora = rewritten(
        facts_archive, tmp_path / "dora.tar", "adapter_config.json",
        lambda values: values.update(use_dora=True),
    )  # fmt: skip
    with pytest.raises(Exception, match="an adapter with use_dora cannot be continued"):
        call_train(train_data=str(facts_file), init_weights=str(dora))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch, base_model_env) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_a_failed_training_closes_its_run_as_failed_with_the_key_masked(
    offline_wandb, facts_file, monkeypatch
):
    from cog import Secret

    import src.training.run
    from tests.helpers import call_train

    def failing(*args, **kwargs):
        raise RuntimeError(f"something broke near {KEY}")

    monkeypatch.setattr(src.training.run, "train_adapter", failing)
    with pytest.raises(RuntimeError, match="something broke"):
        call_train(train_data=str(facts_file), wandb_api_key=Secret(KEY), wandb_run_name="failing")
    run = wandb_run(offline_wandb, "failing")
    assert run["exit_code"] == 1 and run["summary"]["status"] == "failed"
    assert run["summary"]["error"] == "RuntimeError: something broke near ***"


def test_a_reporting_error_never_fails_the_training(offline_wandb, facts_file, monkeypatch, capsys):
    from cog import Secret

    from src.training.tracking import WandbTracker
    from tests.helpers import call_train

    def broken(self, step, values):
        raise ConnectionError(f"upload failed for {KEY}")

    monkeypatch.setattr(WandbTracker, "log_step", broken)
    call_train(
        train_data=str(facts_file), num_train_epochs=1, run_validation=False,
        wandb_api_key=Secret(KEY), wandb_run_name="broken",
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "Weights & Biases: reporting stopped (upload failed for ***)" in out
    assert KEY not in out


def test_patience_running_out_on_the_last_epoch_is_not_an_early_stop():
    from src.training.loop import EpochChoice

    model = torch.nn.Linear(1, 1)
    choice = EpochChoice(keep_best=False, patience=1, epochs=3)
    assert not choice.after_epoch(1, 1.0, model)
    assert choice.after_epoch(2, 2.0, model) and choice.stopped_after == 2  # 1 epoch left
    choice = EpochChoice(keep_best=False, patience=1, epochs=2)
    assert not choice.after_epoch(1, 1.0, model)
    assert not choice.after_epoch(2, 2.0, model) and choice.stopped_after is None
