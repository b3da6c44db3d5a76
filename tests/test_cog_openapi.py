"""`tools.cog_openapi` writes the schema `cog build` would, and coglet enforces it.

Toy `train.py`/`predict.py` files stand in for the project's; the server tests run Cog's real
HTTP server through `tests/cog_server.py` (about half a second per server).
"""

from __future__ import annotations

import base64
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_for
from tools.cog_openapi import go_json, go_number, go_string, main, write_openapi_schema
from tools.cog_server import CogServer, cog_server

TOY_TRAIN = """
import time
from typing import Optional

from cog import BaseModel, CancelationException, Input, Path


class TrainingOutput(BaseModel):
    weights: Path


def train(
    train_data: Path = Input(description="JSONL file"),
    num_train_epochs: int = Input(description="Epochs", default=1, ge=1, le=10),
    lora_target: str = Input(default="all", choices=["all", "qv"]),
    load_in_4bit: bool = Input(default=False),
    learning_rate: float = Input(default=2e-4, ge=1e-7, le=1.0),
    validation_prompt: Optional[str] = Input(default=None),
    run_name: Optional[str] = Input(description="no default"),
    sleep_s: float = Input(default=0.0, ge=0.0, le=10.0),
) -> TrainingOutput:
    try:
        print("training started", flush=True)
        end = time.monotonic() + sleep_s
        while time.monotonic() < end:  # cancellation lands between Python bytecodes
            time.sleep(0.02)
    except CancelationException:
        print("cleanup after cancel", flush=True)
        raise
    seen = dict(epochs=num_train_epochs, target=lora_target, four_bit=load_in_4bit,
                lr=learning_rate, prompt=validation_prompt, run_name=run_name)
    out = Path("weights.json")
    out.write_text(repr(sorted(seen.items())) + " " + train_data.read_text())
    return TrainingOutput(weights=out)
"""

TOY_PREDICT = """
from cog import BaseRunner, ConcatenateIterator, Input, streaming


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        self.weights = weights

    @streaming
    def run(
        self,
        prompt: str = Input(description="Prompt"),
        max_new_tokens: int = Input(default=3, ge=1, le=20),
    ) -> ConcatenateIterator[str]:
        for i in range(max_new_tokens):
            yield f"{prompt}{i} "
"""

TOY_PREDICT_NO_STREAMING = TOY_PREDICT.replace("    @streaming\n", "")

COG_YAML = (
    'build:\n  python_version: "3.11"\npredict: "predict.py:Predictor"\ntrain: "train.py:train"\n'
)

DATA_URI = "data:text/plain;base64," + base64.b64encode(b"rows").decode()
VALID_TRAINING = {"train_data": DATA_URI, "num_train_epochs": 2, "lora_target": "qv"}


def write_project(directory: Path, files: dict[str, str]) -> Path:
    """Write `{file name: source}` into `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes())


# ---------------------------------------------------------------------------
# The schema file
# ---------------------------------------------------------------------------


def test_training_schema_matches_go_generator(tmp_path: Path) -> None:
    write_project(tmp_path, {"train.py": TOY_TRAIN})
    schema = load(write_openapi_schema(tmp_path, None, "train.py:train"))

    components = schema["components"]["schemas"]
    assert list(components) == [
        "TrainingInput",
        "TrainingOutput",
        "lora_target",
        "TrainingRequest",
        "TrainingResponse",
        "Status",
        "HTTPValidationError",
        "ValidationError",
    ]
    assert list(schema["paths"]) == [
        "/",
        "/health-check",
        "/trainings",
        "/trainings/{training_id}/cancel",
    ]
    inputs = components["TrainingInput"]
    assert inputs["required"] == ["train_data"]
    props = inputs["properties"]
    assert list(props) == [
        "train_data",
        "num_train_epochs",
        "lora_target",
        "load_in_4bit",
        "learning_rate",
        "validation_prompt",
        "run_name",
        "sleep_s",
    ]
    assert props["train_data"] == {
        "description": "JSONL file",
        "format": "uri",
        "title": "Train Data",
        "type": "string",
        "x-order": 0,
    }
    assert props["num_train_epochs"] == {
        "default": 1,
        "description": "Epochs",
        "maximum": 10,
        "minimum": 1,
        "title": "Num Train Epochs",
        "type": "integer",
        "x-order": 1,
    }
    assert props["lora_target"] == {
        "allOf": [{"$ref": "#/components/schemas/lora_target"}],
        "default": "all",
        "x-order": 2,
    }
    assert components["lora_target"] == {
        "description": "An enumeration.",
        "enum": ["all", "qv"],
        "title": "lora_target",
        "type": "string",
    }
    assert props["load_in_4bit"]["default"] is False
    assert props["learning_rate"]["default"] == 2e-4
    # `Input(default=None)` on an Optional emits `default: null`; a bare `Input()` does not,
    # and coglet then injects null when the field is omitted.
    assert props["validation_prompt"]["default"] is None
    assert props["validation_prompt"]["nullable"] is True
    assert "default" not in props["run_name"] and props["run_name"]["nullable"] is True
    assert components["TrainingOutput"] == {
        "properties": {"weights": {"format": "uri", "title": "Weights", "type": "string"}},
        "required": ["weights"],
        "title": "Output",
        "type": "object",
    }
    assert "x-cog-streaming" not in schema["paths"]["/trainings"]["post"]


def test_none_default_without_optional_is_required(tmp_path: Path) -> None:
    """Cog's rule: `x: T = Input(default=None)` means "no default", so x is required."""
    source = """
    from typing import Optional
    from cog import Input, Path

    def train(
        seed: int = Input(default=None),
        validation_data: Path = Input(default=None),
        optional_data: Optional[Path] = Input(default=None),
    ) -> Path:
        return optional_data
    """
    write_project(tmp_path, {"train.py": source})
    schema = load(write_openapi_schema(tmp_path, None, "train.py:train"))
    inputs = schema["components"]["schemas"]["TrainingInput"]
    assert inputs["required"] == ["seed", "validation_data"]
    assert "default" not in inputs["properties"]["seed"]
    assert inputs["properties"]["optional_data"]["default"] is None


def test_single_mode_file_is_compact_go_json(tmp_path: Path) -> None:
    write_project(tmp_path, {"train.py": TOY_TRAIN})
    raw = write_openapi_schema(tmp_path, None, "train.py:train").read_text()
    assert raw.startswith('{"components":{"schemas":{"TrainingInput":{"properties":')
    assert '"learning_rate":{"default":0.0002,"maximum":1,"minimum":1e-7,' in raw
    assert not raw.endswith("\n")


def test_predict_schema_streams_only_with_decorator(tmp_path: Path) -> None:
    streaming = write_project(tmp_path / "a", {"predict.py": TOY_PREDICT})
    plain = write_project(tmp_path / "b", {"predict.py": TOY_PREDICT_NO_STREAMING})
    schema = load(write_openapi_schema(streaming, "predict.py:Predictor", None))
    no_stream = load(write_openapi_schema(plain, "predict.py:Predictor", None))

    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    assert "x-cog-streaming" not in no_stream["paths"]["/predictions"]["post"]
    assert schema["components"]["schemas"]["Output"] == {
        "items": {"type": "string"},
        "title": "Output",
        "type": "array",
        "x-cog-array-display": "concatenate",
        "x-cog-array-type": "iterator",
    }
    assert schema["components"]["schemas"]["Input"]["required"] == ["prompt"]


def test_both_modes_merge_into_one_indented_document(tmp_path: Path) -> None:
    write_project(tmp_path, {"train.py": TOY_TRAIN, "predict.py": TOY_PREDICT})
    path = write_openapi_schema(tmp_path, "predict.py:Predictor", "train.py:train")
    raw = path.read_text()
    schema = json.loads(raw)

    assert raw.startswith('{\n  "components": {\n    "schemas": {\n      "HTTPValidationError"')
    assert {"Input", "Output", "TrainingInput", "TrainingOutput"} <= set(
        schema["components"]["schemas"]
    )
    assert {"/predictions", "/trainings", "/trainings/{training_id}/cancel"} <= set(schema["paths"])
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True


def test_cli_reads_cog_yaml_and_leaves_no_modules_behind(tmp_path: Path) -> None:
    write_project(
        tmp_path, {"train.py": TOY_TRAIN, "predict.py": TOY_PREDICT, "cog.yaml": COG_YAML}
    )
    loaded = {name: sys.modules.get(name) for name in ("train", "predict")}
    out = tmp_path / "schema.json"
    assert main(["--project-dir", str(tmp_path), "--out", str(out)]) == 0
    assert {"Input", "TrainingInput"} <= set(load(out)["components"]["schemas"])
    assert {name: sys.modules.get(name) for name in loaded} == loaded


def test_go_json_encoding() -> None:
    assert [go_number(x) for x in (1.0, 0.5, 2e-4, 1e-7, 1.5e-10, 1e20, 1e21)] == [
        "1",
        "0.5",
        "0.0002",
        "1e-7",
        "1.5e-10",
        "100000000000000000000",
        "1e+21",
    ]
    assert go_string("<a & b>\u2028é") == '"\\u003ca \\u0026 b\\u003e\\u2028é"'
    assert go_json({"b": [1, {}], "a": []}) == '{"a":[],"b":[1,{}]}'
    assert go_json({"b": [1], "a": {}}, indent="  ") == '{\n  "a": {},\n  "b": [\n    1\n  ]\n}'


# ---------------------------------------------------------------------------
# Through Cog's real server (both servers read the merged file, as in the image)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("toy_project")
    return write_project(
        directory, {"train.py": TOY_TRAIN, "predict.py": TOY_PREDICT, "cog.yaml": COG_YAML}
    )


@pytest.fixture(scope="module")
def shared_train_server(project: Path) -> Iterator[CogServer]:
    with cog_server(project, "train") as server:
        yield server


@pytest.fixture(scope="module")
def shared_predict_server(project: Path) -> Iterator[CogServer]:
    with cog_server(project, "predict") as server:
        yield server


# The slot is freed just after a response is sent: a request right behind it can get 409.
@pytest.fixture
def train_server(shared_train_server: CogServer) -> CogServer:
    shared_train_server.wait_ready()
    return shared_train_server


@pytest.fixture
def predict_server(shared_predict_server: CogServer) -> CogServer:
    shared_predict_server.wait_ready()
    return shared_predict_server


def train_error(server: CogServer, **changes: Any) -> tuple[int, Any]:
    status, body = server.post("/trainings", {"input": VALID_TRAINING | changes})
    return status, body["detail"][0] if status == 422 else body


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"num_train_epochs": 11}, "num_train_epochs", "11 is greater than the maximum of 10"),
        ({"num_train_epochs": 0}, "num_train_epochs", "0 is less than the minimum of 1"),
        ({"lora_target": "all-linear"}, "lora_target", '"all-linear" is not one of ["all","qv"]'),
        ({"train_data": None}, "train_data", 'null is not of type "string"'),
        ({"validation_prompt": None}, "validation_prompt", 'null is not of type "string"'),
    ],
)
def test_invalid_training_input_is_422(
    train_server: CogServer, changes: dict[str, Any], field: str, message: str
) -> None:
    status, error = train_error(train_server, **changes)
    assert status == 422
    assert error == {"loc": ["body", "input", field], "msg": message, "type": "value_error"}


def test_missing_required_input_is_422(train_server: CogServer) -> None:
    status, body = train_server.post("/trainings", {"input": {"num_train_epochs": 2}})
    assert status == 422
    assert body["detail"] == [
        {
            "loc": ["body", "input", "train_data"],
            "msg": "Field required",
            "type": "value_error.missing",
        }
    ]


def test_valid_training_returns_weights_as_data_uri(train_server: CogServer) -> None:
    status, body = train_server.post("/trainings", {"input": VALID_TRAINING | {"unknown": 1}})
    assert status == 200, body
    assert body["status"] == "succeeded"
    header, payload = body["output"]["weights"].split(",", 1)
    assert header.startswith("data:") and header.endswith(";base64")
    text = base64.b64decode(payload).decode()
    # Defaults filled in, omitted optional without default arrives as None, unknown dropped.
    assert text == (
        "[('epochs', 2), ('four_bit', False), ('lr', 0.0002), ('prompt', None), "
        "('run_name', None), ('target', 'qv')] rows"
    )
    assert "Stripped unknown input fields" in train_server.log_text()


def test_integral_float_passes_for_int(train_server: CogServer) -> None:
    """A validation gap the project must close itself: JSON Schema calls 2.0 an integer."""
    status, body = train_server.post(
        "/trainings", {"input": VALID_TRAINING | {"num_train_epochs": 2.0}}
    )
    assert status == 200, body
    assert (
        "('epochs', 2.0)" in base64.b64decode(body["output"]["weights"].split(",", 1)[1]).decode()
    )


def test_openapi_json_is_the_written_file(train_server: CogServer, project: Path) -> None:
    status, schema = train_server.get("/openapi.json")
    assert status == 200
    assert schema == load(project / ".cog" / "openapi_schema.json")


def test_async_training_reports_to_webhook(
    train_server: CogServer, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    body = {"input": VALID_TRAINING, "webhook": url}
    status, answer = train_server.put("/trainings/t-async", body, {"Prefer": "respond-async"})
    assert (status, answer) == (202, {"id": "t-async", "status": "starting"})

    wait_for(lambda: any(h["status"] == "succeeded" for h in received))
    final = next(h for h in received if h["status"] == "succeeded")
    assert final["id"] == "t-async"
    assert final["output"]["weights"].startswith("data:")


def test_cancel_training(
    train_server: CogServer, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    started = train_server.log_text().count("training started")
    body = {"input": VALID_TRAINING | {"sleep_s": 10}, "webhook": url}
    status, _ = train_server.put("/trainings/t-cancel", body, {"Prefer": "respond-async"})
    assert status == 202
    # Log webhooks are throttled (500 ms) and a throttled one is dropped: read the server log.
    wait_for(lambda: train_server.log_text().count("training started") > started)

    assert train_server.post("/trainings/t-cancel/cancel") == (200, {})
    wait_for(lambda: any(h["status"] == "canceled" for h in received), timeout=5.0)
    canceled = next(h for h in received if h["status"] == "canceled")
    assert "cleanup after cancel" in canceled["logs"]
    assert train_server.post("/trainings/unknown/cancel") == (404, {})


def test_training_routes_refuse_sse(train_server: CogServer) -> None:
    headers = {"Accept": "text/event-stream"}
    status, body = train_server.post("/trainings", {"input": VALID_TRAINING}, headers)
    assert status == 406
    assert body == {"error": "Training endpoints do not support streaming responses."}


def test_prediction_streams_server_sent_events(predict_server: CogServer) -> None:
    events = predict_server.stream_prediction({"prompt": "hi", "max_new_tokens": 3})

    assert [e.event for e in events] == ["start", "output", "output", "output", "completed"]
    assert events[0].data["status"] == "processing"
    assert [e.data for e in events[1:4]] == [
        {"chunk": "hi0 ", "index": 0},
        {"chunk": "hi1 ", "index": 1},
        {"chunk": "hi2 ", "index": 2},
    ]
    completed = events[-1].data
    assert completed["status"] == "succeeded"
    assert completed["output"] == ["hi0 ", "hi1 ", "hi2 "]


def test_prediction_validates_input(predict_server: CogServer) -> None:
    status, body = predict_server.post("/predictions", {"input": {"max_new_tokens": 21}})
    assert status == 422
    assert {e["loc"][-1] for e in body["detail"]} == {"prompt", "max_new_tokens"}

    status, body = predict_server.post("/predictions", {"input": {"prompt": "a"}})
    assert (status, body["output"]) == (200, ["a0 ", "a1 ", "a2 "])


def test_sse_needs_the_streaming_decorator(tmp_path: Path) -> None:
    write_project(tmp_path, {"predict.py": TOY_PREDICT_NO_STREAMING})
    with cog_server(tmp_path, "predict") as server:
        headers = {"Accept": "text/event-stream"}
        status, body = server.post("/predictions", {"input": {"prompt": "a"}}, headers)
    assert status == 406
    assert "@cog.streaming" in body["error"]


def test_failing_setup_is_exposed(tmp_path: Path) -> None:
    source = TOY_PREDICT.replace("self.weights = weights", "raise RuntimeError('no weights')")
    write_project(tmp_path, {"predict.py": source})
    with cog_server(tmp_path, "predict") as server:
        assert server.setup_failed
        status, _ = server.post("/predictions", {"input": {"prompt": "a"}})
    assert status == 503


def test_the_project_schema_shows_the_added_training_inputs_as_optional(tmp_path: Path) -> None:
    """The 18 documented inputs, then the 6 of issue 14, none of them required; the key a
    write-only secret."""
    project = Path(__file__).resolve().parent.parent
    (tmp_path / "train.py").write_text((project / "train.py").read_text())
    (tmp_path / "src").symlink_to(project / "src")
    schema = load(write_openapi_schema(tmp_path, None, "train.py:train"))
    inputs = schema["components"]["schemas"]["TrainingInput"]
    assert inputs["required"] == ["train_data"]
    names = sorted(inputs["properties"], key=lambda name: inputs["properties"][name]["x-order"])
    added = ["init_weights", "keep_best_epoch", "early_stopping_patience", "wandb_api_key",
             "wandb_project", "wandb_run_name"]  # fmt: skip
    assert len(names) == 24 and names[18:] == added
    key = inputs["properties"]["wandb_api_key"]
    assert key["x-cog-secret"] and key["writeOnly"] and key["format"] == "password"
