"""Hostile input to the HTTP API: fuzzing from the OpenAPI schema and hand-made attacks
(decompression bombs, a 100 MB body, deeply nested JSON, non-UTF-8 FASTA, a 10^6-base
sequence, non-finite features, a thousand slow clients). Every request gets a 4xx (or a 503),
never a 5xx; the ingress replica keeps serving and its memory stays bounded.

Figures (cases per endpoint, server errors, ingress RSS, slow-client outcomes) are written to
benchmarks/results/hostile_input.json.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import resource
import secrets
import struct
import time
import zlib
from pathlib import Path

import httpx
import pytest

from conftest import shutdown_serve, start_serve

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hostile_input.json"
# Small limits make the hostile cases cheap; the body limit stays at the default (32 MiB) so the
# 100 MB body meets the limit a deployment has.
HOSTILE_LIMITS = {"max_instances": 50, "max_sequence_length": 500, "max_image_pixels": 1_000_000,
                  "body_timeout_s": 3}
DEFAULT_BODY_LIMIT = 32 * 1024 * 1024
FUZZ_EXAMPLES = int(os.environ.get("MEDRAY_FUZZ_EXAMPLES", 40))  # per operation, media type and mode
FUZZ_SEED = int(os.environ.get("MEDRAY_FUZZ_SEED", 0))
SLOW_CLIENTS = 1000
SLOW_HOLD_S = 6.0
MAX_RSS_GROWTH_MB = 300
PREDICT_ROUTES = ("/v1/exercise/predict", "/v1/ultrasound/predict", "/v1/genomic/predict", "/v1/genomic/generate")


def app_config(tokens_file: str) -> dict:
    """serve/config.yaml with the hostile-input limits and a bearer-token file."""
    from serve.app import default_config

    config = copy.deepcopy(default_config())
    args = config["applications"][0]["args"]
    args["limits"] = dict(args.get("limits") or {}, **HOSTILE_LIMITS)
    args["auth"] = {"tokens_file": tokens_file}
    return config


class Served:
    """The deployed app as the tests see it: base URL, auth headers, an httpx client."""

    def __init__(self, url: str, token: str):
        self.url, self.port = url, int(url.rsplit(":", 1)[1])
        self.headers = {"Authorization": f"Bearer {token}"}
        self.client = httpx.Client(base_url=url, headers=self.headers, timeout=60)
        self.figures: dict = {"limits": dict(HOSTILE_LIMITS, max_body_bytes=DEFAULT_BODY_LIMIT)}
        self.rss_before_mb: float | None = None


def ingress_pid() -> int:
    """PID of the ingress replica (the process that listens on the HTTP port in direct ingress)."""
    import ray
    from ray.util.state import list_actors

    # this session's instance by its address: "auto" would read whichever Ray started last here
    address = ray.get_runtime_context().gcs_address
    for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000):
        if "ServeReplica" in (a.class_name or "") and "ingress" in (a.class_name or "") + (a.name or ""):
            return int(a.pid)
    raise AssertionError("no ingress replica actor found")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def write_figures(figures: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def app(trained, gan, tmp_path_factory):

    bundles = {t: str(trained(t)[1]) for t in ("genomic", "exercise", "ultrasound")}
    bundles["genomic-gan"] = str(gan[1])
    token = secrets.token_urlsafe(24)
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(token + "\n")
    url = start_serve(bundles, config=app_config(str(tokens)))
    served = Served(url, token)
    warm_up(served)
    try:
        yield served
    finally:
        served.client.close()
        write_figures(served.figures)
        print("\nhostile-input figures:", json.dumps(served.figures, indent=2, sort_keys=True))
        shutdown_serve()


def warm_up(s: Served) -> None:
    """One good request per route, then the ingress RSS baseline."""
    assert s.client.get("/v1/models").status_code == 200
    for path, body in good_requests(s).items():
        r = s.client.post(path, **body)
        assert r.status_code == 200, (path, r.text)
    s.rss_before_mb = rss_mb(ingress_pid())


def good_requests(s: Served) -> dict:
    info = s.client.get("/v1/models").json()["models"]
    n = len(info["exercise"]["input"]["feature_names"])
    size = info["ultrasound"]["input"]["size"][0]
    return {
        "/v1/exercise/predict": {"json": {"instances": [[0.1] * n]}},
        "/v1/genomic/predict": {"json": {"sequences": ["ACGT" * 15]}},
        "/v1/ultrasound/predict": {"content": png_bytes(size, size), "headers": {"Content-Type": "image/png"}},
        "/v1/genomic/generate": {"json": {"n": 2, "seed": 1}},
    }


def n_features(s: Served) -> int:
    return len(s.client.get("/v1/models").json()["models"]["exercise"]["input"]["feature_names"])


# --------------------------------------------------------------------------- crafted payloads


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, rows: int | None = None) -> bytes:
    """An 8-bit grayscale PNG of zeros, built by hand so a huge one costs no memory here: its
    IDAT really inflates to `width*height` bytes (or only `rows` rows of them when given)."""
    comp = zlib.compressobj(9)
    line = b"\0" * (width + 1)  # filter byte + pixels
    parts = [comp.compress(line) for _ in range(height if rows is None else rows)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def dicom_rle_bomb(rows: int, cols: int, frames: int) -> bytes:
    """A multi-frame RLE-compressed DICOM whose every frame is within the pixel limit: a few MB
    that inflate to rows*cols*frames bytes (and 8x that as the float64 the reader converts to)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless, generate_uid

    n = rows * cols  # one PackBits segment: runs of 128 zeros (0x81 0x00), then the remainder
    seg = b"\x81\x00" * (n // 128) + (bytes([257 - n % 128]) + b"\x00" if n % 128 else b"")
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + seg + b"\0" * (len(seg) % 2)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = RLELossless
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # ultrasound image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([frame] * frames)
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nested(depth: int, leaf: str = "1", kind: str = "list") -> str:
    if kind == "list":
        return "[" * depth + leaf + "]" * depth
    return '{"a":' * depth + leaf + "}" * depth


def hostile_requests(s: Served) -> list[tuple[str, str, dict, set[int]]]:
    """(name, route, httpx request kwargs, acceptable statuses) for what the issue lists that
    tests/test_serving.py does not already send."""
    nf = n_features(s)
    js = {"Content-Type": "application/json"}
    fasta = {"Content-Type": "text/x-fasta"}
    png = {"Content-Type": "image/png"}
    bomb = png_bytes(20_000, 20_000)  # inflates to 400 MB (a few hundred kB here)
    row = ", 0.0" * (nf - 1)
    mega = "ACGT" * 250_000  # 10^6 bases
    deep = 100_000
    cases = [
        # decompression bombs: refused from the header, before anything is inflated
        ("PNG bomb 20000x20000 (raw body)", "ultrasound", {"content": bomb, "headers": png}, {413}),
        ("PNG bomb (multipart)", "ultrasound", {"files": [("files", ("bomb.png", bomb, "image/png"))]}, {413}),
        ("PNG bomb (base64 JSON)", "ultrasound", {"json": {"images": [base64.b64encode(bomb).decode()]}}, {413}),
        ("PNG claiming 65535x65535 with no pixel data", "ultrasound",
         {"content": png_bytes(65535, 65535, rows=0), "headers": png}, {413}),
        ("DICOM RLE bomb: 1000 frames of 1000x1000", "ultrasound",
         {"content": dicom_rle_bomb(1000, 1000, 1000), "headers": {"Content-Type": "application/dicom"}}, {413}),
        ("DICOM RLE bomb (multipart)", "ultrasound",
         {"files": [("files", ("cine.dcm", dicom_rle_bomb(1000, 1000, 50), "application/dicom"))]}, {413}),
        ("PNG claiming 0x0", "ultrasound", {"content": png_bytes(1, 1)[:16] + b"\0" * 8, "headers": png}, {422}),
        # deeply nested JSON, on every JSON route and in every field
        ("nested list depth 1e5", "exercise", {"content": nested(deep), "headers": js}, {400}),
        ("nested object depth 1e5", "genomic", {"content": nested(deep, kind="dict"), "headers": js}, {400}),
        ("nested depth 1e5 in instances", "exercise",
         {"content": '{"instances": ' + nested(deep) + "}", "headers": js}, {400}),
        ("nested depth 1000 in a feature", "exercise",
         {"content": '{"instances": [[' + nested(1000) + row + "]]}", "headers": js}, {400, 422}),
        ("nested depth 900 in a feature", "exercise",
         {"content": '{"instances": [[' + nested(900) + row + "]]}", "headers": js}, {422}),
        ("nested depth 900 object row", "exercise",
         {"content": '{"instances": [' + nested(900, kind="dict") + "]}", "headers": js}, {422}),
        ("nested depth 900 as a sequence", "genomic",
         {"content": '{"sequences": [' + nested(900) + "]}", "headers": js}, {422}),
        ("nested depth 900 as an image", "ultrasound",
         {"content": '{"images": [' + nested(900, kind="dict") + "]}", "headers": js}, {422}),
        ("nested depth 900 as n", "generate", {"content": '{"n": ' + nested(900) + "}", "headers": js}, {422}),
        ("nested depth 900 as label", "generate",
         {"content": '{"n": 1, "label": ' + nested(900, kind="dict") + "}", "headers": js}, {422}),
        ("nested depth 900 as seed", "generate", {"content": '{"n": 1, "seed": ' + nested(900) + "}", "headers": js},
         {422}),
        ("nested depth 1e5 generate", "generate", {"content": nested(deep), "headers": js}, {400}),
        # non-UTF-8 / odd text FASTA
        ("FASTA in UTF-16 with BOM", "genomic", {"content": ">s1\nACGT\n".encode("utf-16"), "headers": fasta}, {422}),
        ("FASTA with Latin-1 header", "genomic", {"content": b">s\xe91\nACGT\n", "headers": fasta}, {422}),
        ("FASTA with overlong UTF-8", "genomic", {"content": b">s1\nAC\xc0\x80GT\n", "headers": fasta}, {422}),
        ("FASTA with an encoded surrogate", "genomic", {"content": b">s1\nAC\xed\xa0\x80GT\n", "headers": fasta},
         {422}),
        ("FASTA with a non-ASCII letter (found by fuzzing)", "genomic",
         {"content": ">seq1\nACGT\u2026\n".encode(), "headers": fasta}, {422}),
        ("FASTA with NUL bytes", "genomic", {"content": b">s1\nAC\0\0GT\n", "headers": fasta}, {422}),
        ("FASTA of only '>'", "genomic", {"content": b">", "headers": fasta}, {422}),
        ("FASTA of 2000 empty records", "genomic", {"content": b">x\n" * 2000, "headers": fasta}, {413, 422}),
        ("FASTA of 100000 records", "genomic", {"content": b">x\nA\n" * 100_000, "headers": fasta}, {413}),
        ("binary body as FASTA", "genomic", {"content": bytes(range(256)) * 64, "headers": fasta}, {422}),
        # 10^6-base sequences
        ("10^6-base JSON sequence", "genomic", {"json": {"sequences": [mega]}}, {413}),
        ("10^6-base FASTA sequence (one line)", "genomic", {"content": f">big\n{mega}\n", "headers": fasta}, {413}),
        ("10^6-base FASTA sequence (60 per line)", "genomic",
         {"content": ">big\n" + "\n".join(mega[i:i + 60] for i in range(0, len(mega), 60)) + "\n",
          "headers": fasta}, {413}),
        ("10^6 one-base sequences", "genomic", {"json": {"sequences": ["A"] * 1_000_000}}, {413}),
        ("10^6-base invalid sequence", "genomic", {"json": {"sequences": ["N" * 999_999 + "!"]}}, {413, 422}),
        # non-finite and out-of-range features
        ("-Infinity", "exercise", {"content": '{"instances": [[-Infinity' + row + "]]}", "headers": js}, {422}),
        ("1e400 (overflows to inf)", "exercise", {"content": '{"instances": [[1e400' + row + "]]}", "headers": js},
         {422}),
        ("3.5e38 (inf as float32)", "exercise", {"content": '{"instances": [[3.5e38' + row + "]]}", "headers": js},
         {422}),
        ("NaN as a named feature", "exercise",
         {"content": json.dumps({"instances": [{f: 0.0 for f in feature_names(s)}]}).replace("0.0", "NaN", 1),
          "headers": js}, {422}),
        ("integer 10**40 (inf as float32)", "exercise", {"content": '{"instances": [[' + str(10**40) + ", 1" * (nf - 1) + "]]}",
                                        "headers": js}, {422}),
        ("integer of 5000 digits", "exercise", {"content": '{"instances": [[' + "9" * 5000 + row + "]]}",
                                                "headers": js}, {400, 422}),
        ("'NaN' as a string", "exercise", {"json": {"instances": [["NaN"] + [0.0] * (nf - 1)]}}, {422}),
        ("null feature", "exercise", {"json": {"instances": [[None] + [0.0] * (nf - 1)]}}, {422}),
        ("ragged rows", "exercise", {"json": {"instances": [[0.0] * nf, [0.0] * (nf + 1)]}}, {422}),
        # huge or odd values echoed in error details
        ("a 1 MB label", "generate", {"json": {"n": 1, "label": "E" * 1_000_000}}, {422}),
        ("100000 unknown fields", "generate", {"json": {f"k{i}": 0 for i in range(100_000)}}, {422}),
        ("100000 unknown features", "exercise", {"json": {"instances": [{f"k{i}": 0 for i in range(100_000)}]}},
         {422}),
        ("n = 10**30", "generate", {"json": {"n": 10**30}}, {413, 422}),
        ("seed = 2**64", "generate", {"json": {"n": 1, "seed": 2**64}}, {422}),
        ("n = true", "generate", {"json": {"n": True}}, {422}),
        ("base64 of non-ASCII text", "ultrasound", {"json": {"images": ["é" * 100]}}, {422}),
        ("data: URL of garbage", "ultrasound", {"json": {"images": ["data:image/png;base64,AAAA"]}}, {422}),
        ("empty raw image", "ultrasound", {"content": b"", "headers": png}, {400, 422}),
        ("DICOM preamble and garbage", "ultrasound",
         {"content": b"\0" * 128 + b"DICM" + os.urandom(2000), "headers": {"Content-Type": "application/dicom"}},
         {422}),
        ("multipart with a broken boundary", "ultrasound",
         {"content": b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\nabc",
          "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, {400, 422}),
        ("multipart without a boundary", "ultrasound",
         {"content": b"abc", "headers": {"Content-Type": "multipart/form-data"}}, {400, 422}),
        ("multipart with 2000 files", "ultrasound",
         {"files": [("files", (f"{i}.png", b"x", "image/png")) for i in range(2000)]}, {400, 413}),
        ("JSON body that is a bare string", "generate", {"json": "n"}, {422}),
        ("JSON with a UTF-8 BOM", "generate", {"content": b"\xef\xbb\xbf{\"n\": 1}", "headers": js}, {200, 400}),
        ("JSON in UTF-16", "exercise", {"content": json.dumps({"instances": [[0.0] * nf]}).encode("utf-16"),
                                        "headers": js}, {200, 400}),  # RFC 7159 allowed UTF-16
        ("JSON with lone surrogate escape", "genomic", {"content": b'{"sequences": ["\\ud800"]}', "headers": js},
         {400, 422}),
        ("JSON with a NUL escape", "genomic", {"content": b'{"sequences": ["AC\\u0000GT"]}', "headers": js}, {422}),
    ]
    return cases


def feature_names(s: Served) -> list[str]:
    return s.client.get("/v1/models").json()["models"]["exercise"]["input"]["feature_names"]


def route(task: str) -> str:
    return "/v1/genomic/generate" if task == "generate" else f"/v1/{task}/predict"


# --------------------------------------------------------------------------- fuzzing from the schema


def test_fuzz_every_operation_from_the_openapi_schema(app):
    """schemathesis cases (valid and schema-violating) for every operation and body media type."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from schemathesis import GenerationMode

    spec = app.client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    per_operation, failures, statuses = {}, [], {}
    session = __import__("requests").Session()
    for result in schema.get_all_operations():
        op = result.ok()
        body_types = [b.media_type for b in op.body] or [None]
        for media in body_types:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if media is None and mode is GenerationMode.NEGATIVE:
                    continue  # no body, no query: only the (fixed) Authorization header to violate
                label = f"{op.method.upper()} {op.path}" + (f" [{media}]" if media else "") + f" {mode.value}"
                count = [0]

                @seed(FUZZ_SEED)
                @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=False,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode, media_type=media, headers=dict(app.headers)))
                def run(case):
                    count[0] += 1
                    try:
                        r = case.call(base_url=app.url, session=session, headers=app.headers, timeout=60)
                    except Exception as e:  # the server dropped the connection: as bad as a 500
                        failures.append(f"{label}: {type(e).__name__}: {e}"[:500])
                        return
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code >= 500:
                        failures.append(f"{label}: {r.status_code} {r.text[:300]}\n  {case.as_curl_command()[:600]}")

                run()
                per_operation[label] = count[0]
    session.close()
    app.figures["fuzz"] = {"examples_per_run": FUZZ_EXAMPLES, "seed": FUZZ_SEED, "cases_per_operation": per_operation,
                           "cases": sum(per_operation.values()), "statuses": dict(sorted(statuses.items())),
                           "server_errors": len(failures)}
    assert not failures, "\n".join(failures[:20])
    assert {" ".join(op.split(" ")[:2]) for op in per_operation} >= {f"POST {p}" for p in PREDICT_ROUTES}
    assert app.client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- hand-made hostile requests


def test_hand_made_hostile_requests_get_a_4xx_and_the_app_keeps_serving(app):
    failures, outcomes = [], {}
    for name, task, kwargs, ok in hostile_requests(app):
        try:
            r = app.client.post(route(task), **kwargs)
        except httpx.HTTPError as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        outcomes[name] = r.status_code
        named = r.status_code == 200 or (r.headers.get("content-type", "").startswith("application/json")
                                         and set(r.json()) == {"error", "detail"})
        if r.status_code not in ok or not named or len(r.content) > 4096:
            failures.append(f"{name}: {r.status_code} (expected {sorted(ok)}) {len(r.content)} bytes: {r.text[:300]}")
    app.figures["hand_made"] = {"cases": len(outcomes), "statuses": outcomes}
    assert not failures, "\n".join(failures)
    for path, body in good_requests(app).items():
        assert app.client.post(path, **body).status_code == 200, path


async def _raw_exchange(port: int, head: bytes, body_chunks=(), timeout: float = 20) -> tuple[int | None, int]:
    """Send `head` then `body_chunks` on a raw socket, stopping as soon as the server answers:
    (status or None when the connection closed without one, body bytes sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    sent = 0
    try:
        writer.write(head)
        await writer.drain()
        for chunk in body_chunks:
            if answer.done():
                break
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), timeout)
            sent += len(chunk)
    except (ConnectionError, asyncio.TimeoutError):
        pass
    try:
        raw = await asyncio.wait_for(answer, timeout)
        status = int(raw.split(b" ", 2)[1])
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, ValueError, IndexError):
        status = None
    finally:
        answer.cancel()
        writer.close()
    return status, sent


def _head(app: Served, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in {**app.headers, **headers}.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_a_client_that_sends_its_whole_body_first_gets_the_413_not_a_reset(app):
    """urllib writes all of a 64 MB body before it reads the answer. The 413 goes out at once and
    the server reads and discards the rest before closing (nginx's lingering close); closing
    with the data unread would reset the connection (ConnectionResetError, no status)."""
    import urllib.error
    import urllib.request

    body = b'{"sequences": ["' + b"A" * (64 * 2**20) + b'"]}'
    request = urllib.request.Request(f"{app.url}/v1/genomic/predict", data=body, method="POST",
                                     headers={**app.headers, "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=120)
    assert refused.value.code == 413
    answer = json.loads(refused.value.read())
    assert answer["error"] == "body_too_large" and str(DEFAULT_BODY_LIMIT) in answer["detail"], answer
    assert app.client.get("/healthz").status_code == 200  # and the ingress serves on


def test_a_100_mb_body_is_refused_early_against_the_default_32_mib_limit(app):
    total, mib = 100 * 1024 * 1024, 1024 * 1024
    block = b" " * mib

    def plain():
        for _ in range(total // mib):
            yield block

    def chunked():
        for _ in range(total // mib):
            yield b"%x\r\n" % mib + block + b"\r\n"
        yield b"0\r\n\r\n"

    async def both():
        declared = await _raw_exchange(app.port, _head(app, "POST", "/v1/genomic/predict", {
            "Content-Type": "application/json", "Content-Length": str(total)}), plain())
        streamed = await _raw_exchange(app.port, _head(app, "POST", "/v1/ultrasound/predict", {
            "Content-Type": "image/png", "Transfer-Encoding": "chunked"}), chunked())
        return declared, streamed

    t0 = time.perf_counter()
    (declared_status, declared_sent), (streamed_status, streamed_sent) = asyncio.run(both())
    elapsed = time.perf_counter() - t0
    # the client never holds 100 MB either: one 1 MiB block, sent over and over
    app.figures["body_100mb"] = {"declared_length": {"status": declared_status, "sent_mib": declared_sent / mib},
                                 "chunked": {"status": streamed_status, "sent_mib": streamed_sent / mib},
                                 "seconds": round(elapsed, 2)}
    assert declared_status == 413, app.figures["body_100mb"]
    assert declared_sent < 16 * mib, "a declared 100 MB body was read before the 413"
    assert streamed_status == 413, app.figures["body_100mb"]
    assert streamed_sent < DEFAULT_BODY_LIMIT + 16 * mib, "a chunked body was read far past the limit before the 413"
    # and through httpx, a streamed generator body (no Content-Length): 413 or the server closing on it
    try:
        r = app.client.post("/v1/genomic/generate", content=plain(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    except httpx.TransportError:
        pass  # the server answered 413 and closed while httpx was still sending
    assert app.client.get("/healthz").status_code == 200


def test_malformed_http_framing_gets_a_4xx(app):
    cases = {
        "Content-Length of 5000 digits": ({"Content-Type": "application/json", "Content-Length": "9" * 5000}, b"{}"),
        "Content-Length '1e3'": ({"Content-Type": "application/json", "Content-Length": "1e3"}, b"{}"),
        "Content-Length of a non-ASCII digit": ({"Content-Type": "application/json", "Content-Length": "\u00b2"}, b"{}"),
        "negative Content-Length": ({"Content-Type": "application/json", "Content-Length": "-1"}, b"{}"),
        "Content-Length and chunked": ({"Content-Type": "application/json", "Content-Length": "2",
                                        "Transfer-Encoding": "chunked"}, b"{}"),
        "bad chunk size": ({"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, b"zz\r\n{}\r\n0\r\n\r\n"),
        "64 kB header": ({"Content-Type": "application/json", "X-Big": "a" * 65536, "Content-Length": "2"}, b"{}"),
        "Content-Length shorter than the body": ({"Content-Type": "application/json", "Content-Length": "1"}, b"{}"),
    }

    async def run_all():
        out = {}
        for name, (headers, body) in cases.items():
            out[name] = (await _raw_exchange(app.port, _head(app, "POST", "/v1/genomic/predict", headers), [body],
                                             timeout=10))[0]
        return out

    outcomes = asyncio.run(run_all())
    app.figures["http_framing"] = outcomes
    bad = {k: v for k, v in outcomes.items() if v is not None and not 400 <= v < 500}
    assert not bad, outcomes  # None: the HTTP server closed the connection without an answer
    assert app.client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- slow clients


def test_a_thousand_slow_clients_leave_the_app_answering(app):
    """1000 connections held open: a third send nothing, a third trickle their headers, a third
    send headers and then trickle a body. Meanwhile a normal client keeps getting answers (200, or
    503 when overloaded) within a bound; then each slow client finishes (or closes) and gets a 4xx/503."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < SLOW_CLIENTS + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, SLOW_CLIENTS + 1024), hard))
    head_path = "/v1/genomic/predict"
    body = json.dumps({"sequences": ["ACGT" * 15]}).encode()
    outcomes: dict[str, int] = {}
    normal: list[tuple[int, float]] = []

    def count(kind: str, status: int | None):
        key = f"{kind}: {status if status is not None else 'closed'}"
        outcomes[key] = outcomes.get(key, 0) + 1

    async def silent(stop: asyncio.Event):
        r, w = await asyncio.open_connection("127.0.0.1", app.port)
        await stop.wait()
        w.close()
        count("silent (closed by client)", None)

    async def slow_headers(stop: asyncio.Event):
        head = _head(app, "GET", "/v1/nope", {"X-Slow": "x" * 64})
        r, w = await asyncio.open_connection("127.0.0.1", app.port)
        i = 0
        while not stop.is_set() and i < len(head) - 1:
            w.write(head[i:i + 1])
            await w.drain()
            i += 1
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        try:
            w.write(head[i:])
            await w.drain()
            status = int((await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)).split(b" ", 2)[1])
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            status = None
        w.close()
        count("slow headers", status)

    async def slow_body(stop: asyncio.Event):
        head = _head(app, "POST", head_path, {"Content-Type": "application/json", "Content-Length": str(len(body))})
        r, w = await asyncio.open_connection("127.0.0.1", app.port)
        answer = asyncio.ensure_future(r.readuntil(b"\r\n\r\n"))
        i = 0
        try:
            w.write(head)
            await w.drain()
            while not stop.is_set() and not answer.done() and i < len(body) - 1:
                w.write(body[i:i + 1])
                await w.drain()
                i += 1
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
            if not answer.done():  # finish with garbage: an invalid body
                w.write(b"\x00" * (len(body) - i))
                await w.drain()
            status = int((await asyncio.wait_for(answer, 60)).split(b" ", 2)[1])
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            status = None
        answer.cancel()
        w.close()
        count("slow body", status)

    async def normal_client(stop: asyncio.Event):
        async with httpx.AsyncClient(base_url=app.url, headers=app.headers, timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = await c.post(head_path, json={"sequences": ["ACGT" * 15]})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                normal.append((status, time.perf_counter() - t0))
                await asyncio.sleep(0.2)

    async def main():
        stop = asyncio.Event()
        kinds = (silent, slow_headers, slow_body)
        tasks = []
        for i in range(SLOW_CLIENTS):
            tasks.append(asyncio.ensure_future(kinds[i % 3](stop)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        probe = asyncio.ensure_future(normal_client(stop))
        await asyncio.sleep(SLOW_HOLD_S)
        rss_during = rss_mb(ingress_pid())
        stop.set()
        await probe
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return rss_during, [r for r in results if isinstance(r, BaseException)]

    t0 = time.perf_counter()
    rss_during, errors = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    statuses = [s for s, _ in normal]
    app.figures["slow_clients"] = {
        "clients": SLOW_CLIENTS, "hold_s": SLOW_HOLD_S, "outcomes": dict(sorted(outcomes.items())),
        "client_errors": [repr(e)[:200] for e in errors[:5]],
        "normal_requests": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "normal_max_latency_s": round(max(t for _, t in normal), 3) if normal else None,
        "ingress_rss_during_mb": round(rss_during, 1), "seconds": round(elapsed, 1)}
    assert not errors, errors[:5]
    assert normal, "the normal client got no answer at all"
    assert set(statuses) <= {200, 503}, app.figures["slow_clients"]
    assert statuses.count(200) > 0, app.figures["slow_clients"]
    # A body that trickles in holds an ingress slot (max_ongoing_requests) only until the body
    # deadline (limits.body_timeout_s) answers it 408, so the normal client waits at most about that.
    timeout_s = HOSTILE_LIMITS["body_timeout_s"]
    assert max(t for _, t in normal) < timeout_s + 5, app.figures["slow_clients"]
    assert outcomes.get("slow body: 408", 0) > 0, outcomes
    finished = {k: v for k, v in outcomes.items() if not k.startswith("silent")}
    bad = {k: v for k, v in finished.items() if not (k.endswith(": closed") or 400 <= int(k.rsplit(": ", 1)[1]) < 500
                                                     or k.endswith(": 503"))}
    assert not bad, outcomes
    assert app.client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- afterwards


def test_memory_stays_bounded_and_the_app_still_serves(app):
    """Runs last: the ingress replica's RSS after everything above, against the baseline."""
    time.sleep(1)
    pid = ingress_pid()
    after = rss_mb(pid)
    app.figures["ingress_rss_mb"] = {"before": round(app.rss_before_mb, 1), "after": round(after, 1),
                                     "growth": round(after - app.rss_before_mb, 1), "bound": MAX_RSS_GROWTH_MB}
    assert after - app.rss_before_mb < MAX_RSS_GROWTH_MB, app.figures["ingress_rss_mb"]
    assert app.client.get("/healthz").status_code == 200
    assert app.client.get("/readyz").status_code == 200
    for path, body in good_requests(app).items():
        r = app.client.post(path, **body)
        assert r.status_code == 200, (path, r.text)
