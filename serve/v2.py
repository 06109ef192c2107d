"""Open Inference Protocol (KServe v2) over HTTP, /v2, with the binary tensor data extension.

    GET  /v2                                   server metadata (name, version, extensions)
    GET  /v2/health/live | /v2/health/ready    probes (no token, like /healthz and /readyz)
    GET  /v2/models/{model}[/versions/{v}]     model metadata: inputs, outputs, datatypes, shapes, labels
    GET  /v2/models/{model}[/versions/{v}]/ready
    POST /v2/models/{model}[/versions/{v}]/infer

Models are the tasks: `exercise` (input `features`, FP32 [N, F]; FP64 accepted), `genomic`
(`sequences`, BYTES [N]: DNA letters) and `ultrasound` (`images`, BYTES [N]: encoded PNG/JPEG/DICOM
files; base64 strings when sent as JSON `data`, raw file bytes when binary). Outputs:
`probabilities` FP32 [N, K] (columns in the order of the metadata's `labels`) and `label` BYTES [N].
The version is the bundle's (`/v1/models` `version`); a path naming another answers 404.

Binary tensor data: with an `Inference-Header-Content-Length: L` header the body is L bytes of
JSON, then the raw little-endian bytes of each input that declares `parameters.binary_data_size`,
in input order (BYTES elements: a 4-byte little-endian length, then the bytes). Outputs come back
binary when asked (`parameters.binary_data` on an output, or `binary_data_output` on the request,
which tritonclient sends when no output is named): the response then carries the same header and
`binary_data_size` per output.

A tensor becomes the model's input through the same validators as the /v1 bodies
(serve/inputs.py: `feature_rows`/`feature_array`, `sequence_list`, `image_list`/`decode_images`,
`check_count`) and reaches the model through the same `run_model` (serve/gateway.py): values,
limits, 4xx codes, batching and answers are those of /v1. What only /v2 can get wrong — the
request document, datatypes, shapes, tensor sizes and the binary framing — is a 400 naming the
input (`invalid_request`, `invalid_tensor`, `invalid_header`). Errors are the same JSON as
everywhere: `{"error": code, "detail": message}` (the protocol's `error` string is the code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from medray import __version__
from serve.gateway import BATCH_HEADER, ERRORS, Ingress, audit, json_response, media_type, run_model
from serve.inputs import (
    Limits,
    RequestError,
    check_count,
    decode_images,
    feature_array,
    feature_rows,
    image_list,
    parse_json,
    sequence_list,
    show,
)

HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
# model → (input name, what the instances are called in limits' messages, as /v1 calls them)
INPUTS = {"exercise": ("features", "instances"), "genomic": ("sequences", "sequences"),
          "ultrasound": ("images", "images")}
OUTPUTS = ("probabilities", "label")
FLOAT_TYPES = {"FP32": "<f4", "FP64": "<f8"}


def bad_request(detail: str, code: str = "invalid_request") -> RequestError:
    return RequestError(400, code, detail)


def bad_tensor(name: str, detail: str) -> RequestError:
    return RequestError(400, "invalid_tensor", f"input {show(name)}: {detail}")


# --------------------------------------------------------------------------- the request


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list | None = None  # JSON `data`
    raw: bytes | None = None  # binary tensor data


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: dict[str, bool]  # requested output → binary
    json_header: bytes  # the JSON part of the body (searched for booleans, as /v1 searches its body)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The inference request document and its binary tensors, every framing rule checked."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not re.fullmatch(r"[0-9]{1,20}", header_length.strip()):
            raise bad_request(f"{HEADER} is not a byte count: {show(header_length)}", "invalid_header")
        n = int(header_length)
        if n > len(body):
            raise bad_request(f"{HEADER} is {n}, but the body has only {len(body)} bytes", "invalid_header")
        header, binary = body[:n], body[n:]
    doc = parse_json(header)
    if not isinstance(doc, dict):
        raise bad_request(f"expected a JSON object with 'inputs', got {type(doc).__name__}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request(f"'id' must be a string, got {type(request_id).__name__}")
    params = _parameters(doc, "the request")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise bad_request(f"parameters.binary_data_output must be true or false, got {show(binary_default)}")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise bad_request("'inputs' must be a non-empty list of tensors ({\"name\", \"datatype\", \"shape\", "
                          "\"data\"})" + ("" if "inputs" in doc else "; it is missing"))
    inputs, offset, last_binary = [], 0, None
    for i, t in enumerate(items):
        tensor, size = _tensor(t, i)
        if size is not None:
            left = len(binary) - offset
            if size > left:
                raise bad_tensor(tensor.name, f"binary_data_size is {size} bytes, but only {left} bytes of binary "
                                 "data are left after the JSON header and the inputs before it (truncated?)")
            tensor.raw = binary[offset:offset + size]
            offset += size
            last_binary = tensor.name
        inputs.append(tensor)
    if offset != len(binary):
        extra = len(binary) - offset
        where = f"input {show(last_binary)}: " if last_binary is not None else ""
        raise RequestError(400, "invalid_tensor", f"{where}{extra} byte(s) of binary data follow the JSON header "
                           "beyond the inputs' binary_data_size (mis-sized tensor, or a wrong "
                           f"{HEADER})")
    return InferRequest(request_id, inputs, _requested_outputs(doc, binary_default), header)


def _parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(f"'parameters' of {what} must be an object, got {type(params).__name__}")
    return params


def _tensor(t: object, i: int) -> tuple[Tensor, int | None]:
    """One input of the request (without its binary data) and its binary_data_size, if any."""
    if not isinstance(t, dict):
        raise bad_request(f"inputs[{i}] must be an object, got {type(t).__name__}")
    name = t.get("name")
    if not isinstance(name, str):
        raise bad_request(f"inputs[{i}]: 'name' must be a string, got {show(name)}")
    datatype, shape = t.get("datatype"), t.get("shape")
    if not isinstance(datatype, str):
        raise bad_tensor(name, f"'datatype' must be a string, got {show(datatype)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad_tensor(name, f"'shape' must be a list of non-negative integers, got {show(shape)}")
    params = _parameters(t, f"input {show(name)}")
    if "shared_memory_region" in params:
        raise bad_tensor(name, "shared memory is not supported over this API; send 'data' or binary data")
    size = params.get("binary_data_size")
    data = t.get("data")
    if size is not None:
        if type(size) is not int or size < 0:
            raise bad_tensor(name, f"binary_data_size must be a non-negative integer, got {show(size)}")
        if data is not None:
            raise bad_tensor(name, "has both 'data' and binary_data_size (send one)")
    elif data is None:
        raise bad_tensor(name, "has no 'data' (nor parameters.binary_data_size for binary data)")
    elif not isinstance(data, list):
        raise bad_tensor(name, f"'data' must be a list, got {type(data).__name__}")
    return Tensor(name, datatype, shape, data), size


def _requested_outputs(doc: dict, binary_default: bool) -> dict[str, bool]:
    items = doc.get("outputs")
    if items is None:
        return {name: binary_default for name in OUTPUTS}
    if not isinstance(items, list):
        raise bad_request(f"'outputs' must be a list, got {type(items).__name__}")
    out = {}
    for i, o in enumerate(items):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise bad_request(f"outputs[{i}] must be an object with a 'name'")
        name = o["name"]
        if name not in OUTPUTS:
            raise bad_request(f"unknown output {show(name)}; the model's outputs are {', '.join(OUTPUTS)}")
        params = _parameters(o, f"output {name!r}")
        if params.get("classification"):
            raise bad_request(f"output {name!r}: the classification extension is not supported; ask for the "
                              "'label' output (and 'probabilities')")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise bad_request(f"output {name!r}: parameters.binary_data must be true or false, got {show(binary)}")
        out[name] = binary
    if not out:
        raise bad_request("'outputs' is empty: name at least one output, or leave 'outputs' out for all")
    return out


def model_input(task: str, request: InferRequest, info: dict, limits: Limits):
    """The model's raw input from the request's one tensor, validated as /v1 validates its body."""
    name, what = INPUTS[task]
    given = [t.name for t in request.inputs]
    unknown = [n for n in given if n != name]
    if unknown:
        raise bad_tensor(unknown[0], f"unknown input; the {task} model takes one input, {name!r}")
    if len(given) > 1:
        raise bad_tensor(name, "given more than once")
    t = request.inputs[0]
    n = t.shape[0] if t.shape else 0
    if task == "exercise":
        if t.datatype not in FLOAT_TYPES:
            raise bad_tensor(name, f"datatype {show(t.datatype)}; send FP32 (or FP64)")
        if len(t.shape) != 2:
            raise bad_tensor(name, f"shape {t.shape}; expected [N, {len(info['input']['feature_names'])}] "
                             "(N instances of the model's features)")
        check_count(n, what, limits)
        return _features(t, info["input"]["feature_names"], request.json_header)
    if t.datatype != "BYTES":
        raise bad_tensor(name, f"datatype {show(t.datatype)}; send BYTES (one element per {what[:-1]})")
    if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
        raise bad_tensor(name, f"shape {t.shape}; expected [N] (or [N, 1]): one element per {what[:-1]}")
    check_count(n, what, limits)
    items = _bytes_elements(t, n) if t.raw is not None else _json_elements(t, n)
    if task == "genomic":
        return sequence_list(items, limits)
    files = image_list(items) if t.raw is None else [(f"image {i}", b) for i, b in enumerate(items)]
    return decode_images(files, info["input"]["size"][0], limits)


def _features(t: Tensor, feature_names: list[str], json_header: bytes) -> np.ndarray:
    n, f = t.shape
    if t.raw is not None:
        dtype = np.dtype(FLOAT_TYPES[t.datatype])
        want = n * f * dtype.itemsize
        if len(t.raw) != want:
            raise bad_tensor(t.name, f"{len(t.raw)} bytes of binary data; shape {t.shape} of {t.datatype} takes "
                             f"{want} bytes")
        return feature_array(np.frombuffer(t.raw, dtype=dtype).reshape(n, f), feature_names)
    flat = _flatten(t.data, 2)
    if len(flat) != n * f:
        raise bad_tensor(t.name, f"'data' holds {len(flat)} values; shape {t.shape} takes {n * f}")
    may_have_bools = b"true" in json_header or b"false" in json_header
    if f == len(feature_names) and not may_have_bools:  # the common case: numbers, in one numpy call
        try:
            x = np.array(flat)
        except (TypeError, ValueError, RecursionError):
            x = None
        if x is not None and x.ndim == 1 and x.dtype.kind in "iuf":
            return feature_array(x.reshape(n, f).astype(np.float64, copy=False) if x.dtype.kind != "f"
                                 else x.reshape(n, f), feature_names)
    # anything else goes the /v1 way, row by row, for the same error details
    rows = [flat[i * f:(i + 1) * f] for i in range(n)]
    return feature_rows(rows, feature_names, may_have_bools=may_have_bools)


def _flatten(data: list, rank: int) -> list:
    """`data` in row-major order: flat already, or nested to the tensor's rank."""
    for _ in range(rank - 1):
        if not data or not all(isinstance(v, list) for v in data):
            break
        data = [x for v in data for x in v]
    return data


def _json_elements(t: Tensor, n: int) -> list:
    items = _flatten(t.data, len(t.shape))
    if len(items) != n:
        raise bad_tensor(t.name, f"'data' holds {len(items)} elements; shape {t.shape} takes {n}")
    return items


def _bytes_elements(t: Tensor, n: int) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    raw, out, off = memoryview(t.raw), [], 0
    while off < len(raw):
        if len(out) == n:
            raise bad_tensor(t.name, f"binary data holds more than the {n} element(s) of shape {t.shape}")
        if len(raw) - off < 4:
            raise bad_tensor(t.name, f"element {len(out)}: truncated length prefix ({len(raw) - off} of 4 bytes)")
        size = int.from_bytes(raw[off:off + 4], "little")
        off += 4
        if size > len(raw) - off:
            raise bad_tensor(t.name, f"element {len(out)}: declares {size} bytes, only {len(raw) - off} remain "
                             "(truncated)")
        out.append(bytes(raw[off:off + size]))
        off += size
    if len(out) != n:
        raise bad_tensor(t.name, f"binary data holds {len(out)} element(s); shape {t.shape} takes {n}")
    return out


# --------------------------------------------------------------------------- the response


def serialize_bytes(items: list[str]) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in (s.encode("utf-8") for s in items))


def infer_response(task: str, info: dict, request: InferRequest, probs: np.ndarray,
                   headers: dict[str, str]) -> Response:
    labels = info["labels"]
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    predicted = [labels[int(k)] for k in probs.argmax(axis=1)] if len(probs) else []
    outputs, chunks = [], []
    for name, binary in request.outputs.items():
        if name == "probabilities":
            out = {"name": name, "datatype": "FP32", "shape": list(probs.shape)}
            raw = probs.astype("<f4", copy=False).tobytes() if binary else None
            data = None if binary else probs.ravel().tolist()
        else:
            out = {"name": name, "datatype": "BYTES", "shape": [len(predicted)]}
            raw = serialize_bytes(predicted) if binary else None
            data = None if binary else predicted
        if binary:
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = data
        outputs.append(out)
    doc = {"model_name": task, "model_version": info["version"], "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = orjson.dumps(doc)
    if not chunks:
        return Response(header, media_type="application/json", headers=headers)
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={**headers, HEADER: str(len(header))})


def model_metadata(task: str, info: dict) -> dict:
    labels = info["labels"]
    spec = info.get("input") or {}
    if task == "exercise":
        inp = {"name": "features", "datatype": "FP32", "shape": [-1, len(spec["feature_names"])],
               "parameters": {"feature_names": spec["feature_names"]}}
    elif task == "genomic":
        inp = {"name": "sequences", "datatype": "BYTES", "shape": [-1],
               "parameters": {"content": "DNA sequence (IUPAC nucleotide codes)", "length": spec.get("length")}}
    else:
        inp = {"name": "images", "datatype": "BYTES", "shape": [-1],
               "parameters": {"content": "an encoded image file (PNG, JPEG, BMP, TIFF, DICOM); base64 in JSON data",
                              "formats": spec.get("formats"), "size": spec.get("size")}}
    return {
        "name": task,
        "versions": [info["version"]],
        "platform": "medray",
        "inputs": [inp],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(labels)],
                     "parameters": {"labels": labels}},
                    {"name": "label", "datatype": "BYTES", "shape": [-1], "parameters": {"labels": labels}}],
        "parameters": {"labels": labels, "bundle_name": info["name"], "model": info.get("model")},
    }


# --------------------------------------------------------------------------- routes


class TensorSchema(BaseModel):
    name: str
    shape: list[int]
    datatype: str = Field(description="FP32 / FP64 (exercise features), BYTES (sequences, images)")
    parameters: dict | None = Field(None, description="binary_data_size: the input's bytes after the JSON header")
    data: list | None = Field(None, description="row-major values (absent for binary data)")


class RequestedOutput(BaseModel):
    name: str = Field(description="probabilities or label")
    parameters: dict | None = Field(None, description="binary_data: true for a binary output")


class InferRequestSchema(BaseModel):
    id: str | None = None
    parameters: dict | None = Field(None, description="binary_data_output: true for binary outputs")
    inputs: list[TensorSchema] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class InferResponseSchema(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorSchema]


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` references replaced by the definitions (an OpenAPI
    requestBody schema cannot refer to `#/$defs/...`: that is the document's root)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.removeprefix("#/$defs/")]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inline(InferRequestSchema.model_json_schema())},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": f"JSON header + binary tensors; needs {HEADER}"}}}}
_ERR = {"responses": ERRORS}


async def _v2_model(gw, model_name: str, version: str | None) -> dict:
    if model_name not in INPUTS:
        if model_name in gw.models:
            raise RequestError(404, "model_not_found", f"the {model_name} model has no /v2 inference "
                               "(it generates sequences: POST /v1/genomic/generate)")
        raise RequestError(404, "model_not_deployed", f"no model {show(model_name)} is deployed here "
                           f"(/v2 models: {', '.join(t for t in gw.models if t in INPUTS) or 'none'})")
    info = await gw._ready_model(model_name)
    if version is not None and version != info["version"]:
        raise RequestError(404, "model_version_not_found", f"the {model_name} model's version is "
                           f"{info['version']}, not {show(version)}")
    return info


async def _infer(gw, request: Request, model_name: str, version: str | None) -> Response:
    info = await _v2_model(gw, model_name, version)
    mt = media_type(request)
    if mt not in ("application/json", "", "application/octet-stream"):
        raise RequestError(415, "unsupported_media_type", f"{mt!r}: send application/json (with binary "
                           f"tensors: any of application/json, application/octet-stream, and {HEADER})")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):
        raise RequestError(415, "unsupported_media_type", f"Content-Encoding {show(encoding)} is not supported")
    body = await gw._read_body(request)
    req = parse_infer_request(body, request.headers.get(HEADER))
    inputs = model_input(model_name, req, info, gw.limits)
    audit(request, info, len(inputs))
    probs, batch = await run_model(gw, model_name, info, inputs)
    return infer_response(model_name, info, req, probs, {BATCH_HEADER: str(batch)})


router = APIRouter()


@router.get("/v2", summary="Open Inference Protocol: server metadata", responses=ERRORS)
async def v2_server() -> dict:
    return {"name": "medray", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/health/live", summary="Open Inference Protocol: liveness (no token)")
async def v2_live() -> dict:
    return {"live": True}


@router.get("/v2/health/ready", summary="Open Inference Protocol: readiness, every model loaded (no token)",
            responses={503: {"description": "a model is not loaded (/readyz says which and why)"}})
async def v2_ready(gw: Ingress) -> Response:
    ready, _ = await gw.readiness()
    return json_response({"ready": ready}, 200 if ready else 503)


@router.get("/v2/models/{model_name}", summary="Open Inference Protocol: model metadata", **_ERR)
async def v2_metadata(model_name: str, gw: Ingress) -> dict:
    return model_metadata(model_name, await _v2_model(gw, model_name, None))


@router.get("/v2/models/{model_name}/versions/{model_version}", include_in_schema=False)
async def v2_metadata_version(model_name: str, model_version: str, gw: Ingress) -> dict:
    return model_metadata(model_name, await _v2_model(gw, model_name, model_version))


@router.get("/v2/models/{model_name}/ready", summary="Open Inference Protocol: model readiness", **_ERR)
async def v2_model_ready(model_name: str, gw: Ingress) -> dict:
    await _v2_model(gw, model_name, None)
    return {"name": model_name, "ready": True}


@router.get("/v2/models/{model_name}/versions/{model_version}/ready", include_in_schema=False)
async def v2_model_version_ready(model_name: str, model_version: str, gw: Ingress) -> dict:
    await _v2_model(gw, model_name, model_version)
    return {"name": model_name, "ready": True}


@router.post("/v2/models/{model_name}/infer", summary="Open Inference Protocol: inference (JSON or binary tensors)",
             response_model=InferResponseSchema, openapi_extra=_INFER_BODY, **_ERR)
async def v2_infer(request: Request, model_name: str, gw: Ingress) -> Response:
    return await _infer(gw, request, model_name, None)


@router.post("/v2/models/{model_name}/versions/{model_version}/infer", include_in_schema=False)
async def v2_infer_version(request: Request, model_name: str, model_version: str, gw: Ingress) -> Response:
    return await _infer(gw, request, model_name, model_version)
