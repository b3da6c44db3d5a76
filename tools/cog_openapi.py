"""Write `.cog/openapi_schema.json` the way `cog build` does, without the Go CLI or Docker.

Cog's Rust server (coglet) validates request inputs, serves `/openapi.json` and enables
server-sent events only when `.cog/openapi_schema.json` exists in its working directory.
`cog build` writes that file with a static Go generator (`pkg/schema/openapi_spec.go` and
`pkg/schema/generator.go` in replicate/cog); no Python package ships it. This module stands in
for that build step: it reads the `Input` declarations with `cog._inspector` (the SDK's own
introspection) and emits the same document, byte for byte where the Go rules are known:

* one schema per mode (`Input`/`Output`, `/predictions` or `TrainingInput`/`TrainingOutput`,
  `/trainings`); with both `predict` and `train` configured, the two are merged into one file
  (predict wins on name clashes, e.g. two choice enums named after the same parameter);
* `x-order`, `minimum`/`maximum`, `minLength`/`maxLength`, `pattern`, `nullable`, `default`,
  choices as enum components referenced through `allOf`, `format: uri` for `Path`;
* `x-cog-streaming: true` on `/predictions` only when `run()`/`predict()` carries
  `@cog.streaming` (an iterator return type alone does not enable SSE);
* Go's JSON encoding: compact for one mode, two-space indented with sorted keys when merged.

CLI: `python -m tools.cog_openapi [--predict predict.py:Predictor] [--train train.py:train]
[--out .cog/openapi_schema.json]`; the references default to cog.yaml's `predict` (or `run`)
and `train` keys. Pass an empty string to leave a mode out.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import enum
import importlib
import inspect
import json
import math
import os
import sys
import tempfile
import textwrap
import typing
import warnings
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import cog
from cog import _adt as adt
from cog import _inspector
from cog.input import FieldInfo

SCHEMA_RELPATH = Path(".cog") / "openapi_schema.json"

Json = dict[str, Any]


class Ordered(dict[str, Any]):
    """A JSON object whose keys keep insertion order (Go's `orderedMapAny`).

    Plain dicts are written with sorted keys, like Go's `map[string]any`.
    """


@dataclasses.dataclass(frozen=True)
class ModeNames:
    """The names that differ between predict and train schemas."""

    endpoint: str
    request: str
    response: str
    cancel: str
    summary: str
    description: str
    operation_id: str
    cancel_operation_id: str
    cancel_param: str
    input: str
    output: str


PREDICT = ModeNames(
    endpoint="/predictions",
    request="PredictionRequest",
    response="PredictionResponse",
    cancel="/predictions/{prediction_id}/cancel",
    summary="Predict",
    description="Run a single prediction on the model",
    operation_id="predict_predictions_post",
    cancel_operation_id="cancel_predictions__prediction_id__cancel_post",
    cancel_param="prediction_id",
    input="Input",
    output="Output",
)
TRAIN = ModeNames(
    endpoint="/trainings",
    request="TrainingRequest",
    response="TrainingResponse",
    cancel="/trainings/{training_id}/cancel",
    summary="Train",
    description="Run a single training on the model",
    operation_id="train_trainings_post",
    cancel_operation_id="cancel_trainings__training_id__cancel_post",
    cancel_param="training_id",
    input="TrainingInput",
    output="TrainingOutput",
)


@dataclasses.dataclass(frozen=True)
class Param:
    """One input as the Go parser sees it: the inspector's field plus the raw declaration."""

    field: adt.InputField
    has_default: bool
    default: Any
    accept: str | None


@dataclasses.dataclass(frozen=True)
class Target:
    """Everything the schema needs to know about one `predict`/`train` callable."""

    params: list[Param]
    output: Json
    streaming: bool


# ---------------------------------------------------------------------------
# Loading the user's callable
# ---------------------------------------------------------------------------


def split_ref(ref: str) -> tuple[str, str]:
    """`"src/predict.py:Predictor"` -> (`"src.predict"`, `"Predictor"`)."""
    path, sep, name = ref.partition(":")
    if not sep or not path or not name:
        raise ValueError(f"invalid reference {ref!r}: expected 'file.py:Name'")
    module = path.removesuffix(".py").replace("\\", "/").strip("/").replace("/", ".")
    return module, name


def _module_family(module_name: str) -> list[str]:
    parts = module_name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _is_project_module(module: Any, root: Path) -> bool:
    """Loaded from `root`, but not from an environment inside it (e.g. `root/.venv`)."""
    file = getattr(module, "__file__", None)
    if file is None:
        return False
    path = Path(file).resolve()
    environments = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    return path.is_relative_to(root) and not any(path.is_relative_to(e) for e in environments)


@contextlib.contextmanager
def project_imports(project_dir: Path, module_name: str) -> Iterator[None]:
    """Import from `project_dir` without leaking its modules into this process.

    Modules of the same name already loaded (another project's `train`, say) are set aside
    and restored; modules loaded from `project_dir` during the block are dropped afterwards.
    """
    root = project_dir.resolve()
    shadowed = {n: sys.modules.pop(n) for n in _module_family(module_name) if n in sys.modules}
    before = set(sys.modules)
    write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(root))
        sys.dont_write_bytecode = write_bytecode
        for name in set(sys.modules) - before:
            if _is_project_module(sys.modules[name], root):
                del sys.modules[name]
        sys.modules.update(shadowed)


def _target_function(obj: Any, fullname: str, mode: ModeNames) -> Callable[..., Any]:
    """The function whose signature declares the inputs (Go: `findTargetCallableNode`)."""
    if inspect.isfunction(obj):
        return _inspector._unwrap(obj)
    if not inspect.isclass(obj):
        raise ValueError(f"predictor not found or not a class/function: {fullname}")
    if mode is TRAIN:
        return _inspector._unwrap(obj.train)
    _, fn = _inspector._selected_predict_method(obj, fullname)
    return _inspector._unwrap(fn)


def _predictor_info(
    module_name: str, name: str, fn: Callable[..., Any], is_class: bool, mode: ModeNames
) -> adt.PredictorInfo:
    if mode is TRAIN and is_class:  # create_predictor only knows run()/predict()
        return _inspector._create_predictor_info(module_name, name, fn, "train", True)
    return _inspector.create_predictor(module_name, name)


def load_target(project_dir: Path, ref: str, mode: ModeNames) -> Target:
    """Import `ref` from `project_dir` and describe its inputs, output and streaming flag."""
    module_name, name = split_ref(ref)
    with project_imports(project_dir, module_name), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # BasePredictor / predict()
        module = importlib.import_module(module_name)
        obj = getattr(module, name, None)
        fn = _target_function(obj, f"{module_name}.{name}", mode)
        info = _predictor_info(module_name, name, fn, inspect.isclass(obj), mode)
        node = _function_node(fn)
        params = _params(info, fn, node)
        output = output_schema(info.output, _return_type(fn))
        streaming = node is not None and _has_streaming_decorator(node, vars(module))
    if streaming and info.output.kind not in _STREAMING_KINDS:
        raise ValueError(f"{ref}: @streaming requires an Iterator or ConcatenateIterator output")
    return Target(params=params, output=output, streaming=streaming and mode is PREDICT)


# ---------------------------------------------------------------------------
# What only the source says: `Input(default=None)` vs `Input()`, and `@streaming`
# ---------------------------------------------------------------------------

_STREAMING_KINDS = (adt.OutputKind.ITERATOR, adt.OutputKind.CONCAT_ITERATOR)


def _function_node(fn: Callable[..., Any]) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
    return None


def _explicit_default_args(node: ast.FunctionDef | ast.AsyncFunctionDef | None) -> set[str]:
    """Parameters declared `Input(default=...)` or `Input(<value>, ...)` in the source."""
    if node is None:
        return set()
    args = [*node.args.posonlyargs, *node.args.args]
    pairs = zip(args[len(args) - len(node.args.defaults) :], node.args.defaults, strict=True)
    return {
        arg.arg
        for arg, default in pairs
        if isinstance(default, ast.Call)
        and (default.args or any(k.arg == "default" for k in default.keywords))
    }


def _resolve_name(expr: ast.expr, namespace: dict[str, Any]) -> Any:
    if isinstance(expr, ast.Name):
        return namespace.get(expr.id)
    if isinstance(expr, ast.Attribute):
        return getattr(_resolve_name(expr.value, namespace), expr.attr, None)
    return None


def _has_streaming_decorator(
    node: ast.FunctionDef | ast.AsyncFunctionDef, namespace: dict[str, Any]
) -> bool:
    """True when the function carries `@cog.streaming` / `@streaming` / `@streaming()`."""
    for decorator in node.decorator_list:
        expr = decorator.func if isinstance(decorator, ast.Call) else decorator
        if _resolve_name(expr, namespace) is cog.streaming:
            return True
    return False


def _params(
    info: adt.PredictorInfo,
    fn: Callable[..., Any],
    node: ast.FunctionDef | ast.AsyncFunctionDef | None,
) -> list[Param]:
    declared = {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    explicit = _explicit_default_args(node)
    return [_param(field, declared, explicit) for field in info.inputs.values()]


def _param(field: adt.InputField, declared: dict[str, Any], explicit: set[str]) -> Param:
    if field.name not in declared:
        return Param(field, has_default=False, default=None, accept=None)
    raw = declared[field.name]
    if not isinstance(raw, FieldInfo):
        return Param(field, has_default=True, default=raw, accept=None)
    has_default = raw.default is not None or field.name in explicit
    return Param(field, has_default=has_default, default=raw.default, accept=raw.accept)


def _return_type(fn: Callable[..., Any]) -> Any:
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except (NameError, TypeError):  # unresolvable forward refs: the inspector's fallback too
        hints = inspect.getfullargspec(fn).annotations
    return _inspector._strip_non_opaque_annotated(hints["return"])


# ---------------------------------------------------------------------------
# JSON Schema fragments (Go: PrimitiveType.JSONType, inputTypeJSONSchema, SchemaType)
# ---------------------------------------------------------------------------

_PRIMITIVE_SCHEMAS: dict[adt.PrimitiveType, Json] = {
    adt.PrimitiveType.BOOL: {"type": "boolean"},
    adt.PrimitiveType.FLOAT: {"type": "number"},
    adt.PrimitiveType.INTEGER: {"type": "integer"},
    adt.PrimitiveType.STRING: {"type": "string"},
    adt.PrimitiveType.PATH: {"type": "string", "format": "uri"},
    adt.PrimitiveType.FILE: {"type": "string", "format": "uri"},
    adt.PrimitiveType.SECRET: {
        "type": "string",
        "format": "password",
        "writeOnly": True,
        "x-cog-secret": True,
    },
    adt.PrimitiveType.ANY: {"type": "object"},
}

_LISTS = (adt.Repetition.REPEATED, adt.Repetition.OPTIONAL_REPEATED)
_OPTIONALS = (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)


def primitive_schema(primitive: Any) -> Json:
    """JSON type of one primitive; `Any` outputs and opaque values are objects."""
    if primitive not in _PRIMITIVE_SCHEMAS:
        if isinstance(primitive, adt.PrimitiveType):
            raise ValueError(f"{primitive.name} types are not supported by the static schema")
        return {"type": "object"}  # cog._inspector's placeholder for `-> Any`
    return dict(_PRIMITIVE_SCHEMAS[primitive])


def input_type_schema(ft: adt.FieldType) -> Json:
    """Schema of an input's type, before the property-level keywords are added."""
    if ft.union_variants is not None:
        nullable = ft.repetition is adt.Repetition.OPTIONAL
        extra = {"nullable": True} if nullable else {}
        variants = [input_type_schema(v) | extra for v in ft.union_variants]
        return {"anyOf": variants} | extra
    if ft.repetition in _LISTS:
        return {"type": "array", "items": primitive_schema(ft.primitive)}
    return primitive_schema(ft.primitive)


def field_schema(ft: adt.FieldType) -> Json:
    """Schema of a field of an output object (Go: `SchemaType.jsonSchema(false)`)."""
    if ft.union_variants is not None:
        raise ValueError("union types are not supported as output")
    schema = input_type_schema(ft)
    if ft.repetition in _OPTIONALS:
        schema["nullable"] = True
    return schema


def _object_schema(fields: dict[str, adt.FieldType], cls: Any) -> Json:
    properties = Ordered()
    required = []
    for name, ft in fields.items():
        properties[name] = field_schema(ft) | {"title": title_case(name)}
        if ft.repetition not in _OPTIONALS and not _field_has_default(cls, name):
            required.append(name)
    schema: Json = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _field_has_default(cls: Any, name: str) -> bool:
    if dataclasses.is_dataclass(cls):
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        missing = dataclasses.MISSING
        return field.default is not missing or field.default_factory is not missing
    model_fields = getattr(cls, "model_fields", {})
    return name in model_fields and not model_fields[name].is_required()


def output_schema(output: adt.OutputType, return_type: Any) -> Json:
    """The `Output` / `TrainingOutput` component (titled "Output" in both modes, as in Go)."""
    if output.coder is not None:
        raise ValueError("custom-coder outputs are not supported by the static schema")
    kind = output.kind
    if kind is adt.OutputKind.OBJECT:
        assert output.fields is not None
        schema = _object_schema(output.fields, return_type)
    elif kind is adt.OutputKind.SINGLE:
        schema = primitive_schema(output.type)
    else:
        schema = {"type": "array", "items": primitive_schema(output.type)}
    if kind in _STREAMING_KINDS:
        schema["x-cog-array-type"] = "iterator"
    if kind is adt.OutputKind.CONCAT_ITERATOR:
        schema["x-cog-array-display"] = "concatenate"
    return schema | {"title": "Output"}


def title_case(name: str) -> str:
    """Go's `TitleCase`: snake_case -> "Snake Case" (only first letters change)."""
    return " ".join(p[:1].upper() + p[1:] for p in name.split("_"))


def json_value(value: Any) -> Any:
    """A declared default or choice as JSON (enums by value, paths as strings)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    raise ValueError(f"default {value!r} cannot be written to the schema")


# ---------------------------------------------------------------------------
# The Input component (Go: buildInputSchema)
# ---------------------------------------------------------------------------


def _is_nullable(param: Param) -> bool:
    ft = param.field.type
    secret_none = (
        ft.primitive is adt.PrimitiveType.SECRET
        and ft.repetition is adt.Repetition.REQUIRED
        and param.has_default
        and param.default is None
    )
    return ft.repetition in _OPTIONALS or secret_none


def _is_required(param: Param, has_effective_default: bool) -> bool:
    ft = param.field.type
    required_shape = ft.repetition in (adt.Repetition.REQUIRED, adt.Repetition.REPEATED)
    return not has_effective_default and (ft.union_variants is not None or required_shape)


def _enum_component(param: Param) -> Json:
    field = param.field
    assert field.choices is not None
    enum_type = primitive_schema(field.type.primitive).get("type") or "string"
    return {
        "title": field.name,
        "description": "An enumeration.",
        "enum": [json_value(c) for c in field.choices],
        "type": enum_type,
    }


def _constraints(param: Param) -> Json:
    field = param.field
    keywords = {
        "description": field.description,
        "minimum": field.ge,
        "maximum": field.le,
        "minLength": field.min_length,
        "maxLength": field.max_length,
        "pattern": field.regex,
        "deprecated": True if field.deprecated else None,
        "x-cog-accept": param.accept,
    }
    return {k: v for k, v in keywords.items() if v is not None}


def input_property(param: Param) -> tuple[Json, Json | None]:
    """One property of the Input component, plus its enum component when it has choices."""
    field = param.field
    prop: Json = {"x-order": field.order}
    enum_schema = _enum_component(param) if field.choices else None
    if enum_schema is not None:
        prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
    else:
        prop |= {"title": title_case(field.name)} | input_type_schema(field.type)
    nullable = _is_nullable(param)
    # `x: int = Input(default=None)` means "no default" (e.g. a seed picked at run time).
    has_effective_default = param.has_default and (param.default is not None or nullable)
    if has_effective_default:
        prop["default"] = json_value(param.default)
    if nullable:
        prop["nullable"] = True
    return prop | _constraints(param), enum_schema


def input_schema(params: list[Param], title: str) -> tuple[Json, list[tuple[str, Json]]]:
    """The Input (or TrainingInput) component and the enum components it refers to."""
    properties = Ordered()
    required: list[str] = []
    enums: list[tuple[str, Json]] = []
    for param in params:
        prop, enum_schema = input_property(param)
        properties[param.field.name] = prop
        if _is_required(param, "default" in prop):
            required.append(param.field.name)
        if enum_schema is not None:
            enums.append((param.field.name, enum_schema))
    schema: Json = {"title": title, "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


# ---------------------------------------------------------------------------
# The document (Go: buildOpenAPISpec, MergeSchemas)
# ---------------------------------------------------------------------------


def _json_response(schema: Json) -> Json:
    return {
        "description": "Successful Response",
        "content": {"application/json": {"schema": schema}},
    }


_VALIDATION_ERROR_RESPONSE: Json = {
    "description": "Validation Error",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
    },
}

_TIME = {"type": "string", "format": "date-time"}
_SHARED_COMPONENTS: dict[str, Json] = {
    "Status": {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    },
    "HTTPValidationError": {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {
                "title": "Detail",
                "type": "array",
                "items": {"$ref": "#/components/schemas/ValidationError"},
            },
        },
    },
    "ValidationError": {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {
                "title": "Location",
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    },
}


def _request_response(names: ModeNames) -> dict[str, Json]:
    input_ref = {"$ref": f"#/components/schemas/{names.input}"}
    output_ref = {"$ref": f"#/components/schemas/{names.output}"}
    text = {"type": "string"}
    response_props = {
        "input": input_ref,
        "output": output_ref,
        "id": {"title": "Id"} | text,
        "version": {"title": "Version"} | text,
        "created_at": {"title": "Created At"} | _TIME,
        "started_at": {"title": "Started At"} | _TIME,
        "completed_at": {"title": "Completed At"} | _TIME,
        "status": {"title": "Status"} | text,
        "error": {"title": "Error"} | text,
        "logs": {"title": "Logs"} | text,
        "metrics": {"title": "Metrics", "type": "object"},
    }
    request_props = {"id": {"title": "Id"} | text, "input": input_ref}
    return {
        names.request: {"title": names.request, "type": "object", "properties": request_props},
        names.response: {"title": names.response, "type": "object", "properties": response_props},
    }


def _components(target: Target, names: ModeNames) -> Ordered:
    inputs, enums = input_schema(target.params, names.input)
    components = Ordered({names.input: inputs, names.output: target.output})
    components.update(enums)
    components.update(_request_response(names))
    components.update(_SHARED_COMPONENTS)
    return components


def _main_operation(target: Target, names: ModeNames) -> Json:
    operation: Json = {
        "summary": names.summary,
        "description": names.description,
        "operationId": names.operation_id,
        "requestBody": {
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{names.request}"}}
            }
        },
        "responses": {
            "200": _json_response({"$ref": f"#/components/schemas/{names.response}"}),
            "422": _VALIDATION_ERROR_RESPONSE,
        },
    }
    if target.streaming:
        operation["x-cog-streaming"] = True
    return operation


def _cancel_operation(names: ModeNames) -> Json:
    parameter = {
        "required": True,
        "schema": {"title": title_case(names.cancel_param), "type": "string"},
        "name": names.cancel_param,
        "in": "path",
    }
    return {
        "summary": "Cancel",
        "operationId": names.cancel_operation_id,
        "parameters": [parameter],
        "responses": {"200": _json_response({}), "422": _VALIDATION_ERROR_RESPONSE},
    }


def _paths(target: Target, names: ModeNames) -> Ordered:
    root = {"summary": "Root", "operationId": "root__get", "responses": {"200": _json_response({})}}
    health = {
        "summary": "Healthcheck",
        "operationId": "healthcheck_health_check_get",
        "responses": {"200": _json_response({})},
    }
    return Ordered(
        {
            "/": {"get": root},
            "/health-check": {"get": health},
            names.endpoint: {"post": _main_operation(target, names)},
            names.cancel: {"post": _cancel_operation(names)},
        }
    )


def build_spec(target: Target, names: ModeNames) -> Json:
    """The OpenAPI 3.0.2 document for one mode."""
    spec = {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": cog.__version__},
        "paths": _paths(target, names),
        "components": {"schemas": _components(target, names)},
    }
    remove_title_next_to_ref(spec)
    return spec


def remove_title_next_to_ref(value: Any) -> None:
    """OpenAPI 3.0 allows no siblings next to `$ref` (Go: `removeTitleNextToRef`)."""
    if isinstance(value, dict):
        if "$ref" in value:
            value.pop("title", None)
        for child in value.values():
            remove_title_next_to_ref(child)
    elif isinstance(value, list):
        for child in value:
            remove_title_next_to_ref(child)


def merge_specs(predict: Json, train: Json) -> Json:
    """Go's `MergeSchemas`: the predict document plus what only the train document has."""
    for path, item in train["paths"].items():
        predict["paths"].setdefault(path, item)
    predict_schemas = predict["components"]["schemas"]
    for name, schema in train["components"]["schemas"].items():
        predict_schemas.setdefault(name, schema)
    return predict


# ---------------------------------------------------------------------------
# Go's encoding/json
# ---------------------------------------------------------------------------

_GO_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028"}
_GO_HTML_ESCAPES["\u2029"] = "\\u2029"


def go_string(text: str) -> str:
    """A JSON string as Go's `json.Marshal` writes it (HTML-safe escapes included)."""
    encoded = json.dumps(text, ensure_ascii=False)
    for char, escape in _GO_HTML_ESCAPES.items():
        encoded = encoded.replace(char, escape)
    return encoded


def go_number(value: float) -> str:
    """A float64 as Go's `json.Marshal` writes it (`1`, `0.5`, `1e-7`, `1e+21`)."""
    if not math.isfinite(value):
        raise ValueError(f"{value} cannot be written as JSON")
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        mantissa, exponent = repr(float(value)).split("e")
        sign, digits = exponent[0], exponent[1:]
        return f"{mantissa}e{sign}{digits if sign == '+' else digits.lstrip('0') or '0'}"
    text = format(Decimal(repr(float(value))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def go_json(value: Any, indent: str | None = None, level: int = 0) -> str:
    """Marshal like Go: `Ordered` keeps key order, other dicts are sorted, no spaces.

    With `indent`, like `json.MarshalIndent(v, "", indent)`.
    """
    if isinstance(value, dict):
        keys = list(value) if isinstance(value, Ordered) else sorted(value)
        colon = ": " if indent else ":"
        items = [go_string(k) + colon + go_json(value[k], indent, level + 1) for k in keys]
        return _go_container("{}", items, indent, level)
    if isinstance(value, (list, tuple)):
        return _go_container("[]", [go_json(v, indent, level + 1) for v in value], indent, level)
    if isinstance(value, str):
        return go_string(value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_number(value)
    raise TypeError(f"cannot marshal {value!r}")


def _go_container(brackets: str, items: list[str], indent: str | None, level: int) -> str:
    if not items:
        return brackets
    if indent is None:
        return brackets[0] + ",".join(items) + brackets[1]
    inner = "\n" + indent * (level + 1)
    return brackets[0] + inner + ("," + inner).join(items) + "\n" + indent * level + brackets[1]


def _sorted_numbers(value: Any) -> Any:
    """What a Go `json.Unmarshal` into `map[string]any` does: key order gone, numbers float64."""
    if isinstance(value, dict):
        return {k: _sorted_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sorted_numbers(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def generate_openapi_schema(
    project_dir: Path, predict_ref: str | None, train_ref: str | None
) -> bytes:
    """The bytes `cog build` writes for these references (Go: `GenerateCombined`)."""
    if not predict_ref and not train_ref:
        raise ValueError("no predict or train reference provided")
    specs = {
        names: build_spec(load_target(project_dir, ref, names), names)
        for names, ref in ((PREDICT, predict_ref), (TRAIN, train_ref))
        if ref
    }
    if len(specs) == 1:
        (spec,) = specs.values()
        return go_json(spec).encode()
    merged = merge_specs(_sorted_numbers(specs[PREDICT]), _sorted_numbers(specs[TRAIN]))
    return go_json(merged, indent="  ").encode()


def write_openapi_schema(project_dir: Path, predict_ref: str | None, train_ref: str | None) -> Path:
    """Write `<project_dir>/.cog/openapi_schema.json` as `cog build` would; return its path.

    This is the schema step of `cog build`: coglet reads the file from its working directory
    to validate inputs (`Input` for /predictions, `TrainingInput` for /trainings), to serve
    /openapi.json and to allow SSE (`x-cog-streaming`).
    """
    out = Path(project_dir) / SCHEMA_RELPATH
    write_bytes(out, generate_openapi_schema(Path(project_dir), predict_ref, train_ref))
    return out


def write_bytes(path: Path, data: bytes) -> None:
    """Write atomically (temp file + rename), like Go's `files.AtomicWrite`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    Path(tmp).replace(path)


def cog_yaml_refs(project_dir: Path) -> tuple[str | None, str | None]:
    """(`predict` or `run`, `train`) from `<project_dir>/cog.yaml`, None where absent."""
    config_path = project_dir / "cog.yaml"
    if not config_path.is_file():
        return None, None
    import yaml  # PyYAML comes with huggingface_hub; imported here so the module loads without

    config = yaml.safe_load(config_path.read_text()) or {}
    return config.get("predict") or config.get("run"), config.get("train")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.cog_openapi",
        description="Write .cog/openapi_schema.json as `cog build` would.",
    )
    parser.add_argument("--project-dir", type=Path, default=Path.cwd())
    parser.add_argument("--predict", help="e.g. predict.py:Predictor ('' for none)")
    parser.add_argument("--train", help="e.g. train.py:train ('' for none)")
    parser.add_argument("--out", type=Path, help=f"default: <project-dir>/{SCHEMA_RELPATH}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the path written."""
    args = _parse_args(argv)
    project_dir: Path = args.project_dir.resolve()
    yaml_predict, yaml_train = cog_yaml_refs(project_dir)
    predict_ref = yaml_predict if args.predict is None else args.predict
    train_ref = yaml_train if args.train is None else args.train
    out = args.out or project_dir / SCHEMA_RELPATH
    write_bytes(out, generate_openapi_schema(project_dir, predict_ref, train_ref))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
