"""The baseline a user would write first: one FastAPI/uvicorn process, the model run once per request.

Same routes, the same request parsing (serve/inputs.py) and the same `Bundle.predict` as the
Serve application, so the benchmark compares serving machinery, not parsing code.

    python benchmarks/plain_server.py --port 8100 BUNDLE_DIR…
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import Response  # noqa: E402

from medray.bundle import load_bundle  # noqa: E402
from serve.inputs import (  # noqa: E402
    Limits,
    RequestError,
    decode_images,
    images_from_json,
    parse_features,
    parse_sequences,
    prediction_objects,
)


def make_app(bundle_dirs: list[str]) -> FastAPI:
    bundles = {b.task: b for b in map(load_bundle, bundle_dirs)}
    limits = Limits()
    app = FastAPI()

    def answer(task, inputs):
        b = bundles[task]
        probs = b.predict(inputs)
        return Response(orjson.dumps({"predictions": prediction_objects(probs, b.labels),
                                      "model": {"name": b.name, "version": b.version}}),
                        media_type="application/json")

    @app.exception_handler(RequestError)
    async def _err(request, e: RequestError):
        return Response(orjson.dumps({"error": e.code, "detail": e.detail}), status_code=e.status,
                        media_type="application/json")

    @app.post("/v1/exercise/predict")
    async def exercise(request: Request):
        b = bundles["exercise"]
        return answer("exercise", parse_features(await request.body(), b.preprocessor.feature_names, limits))

    @app.post("/v1/genomic/predict")
    async def genomic(request: Request):
        ct = request.headers.get("content-type", "").split(";")[0]
        return answer("genomic", parse_sequences(await request.body(), ct, limits)[1])

    @app.post("/v1/ultrasound/predict")
    async def ultrasound(request: Request):
        files = images_from_json(await request.body(), limits)
        return answer("ultrasound", decode_images(files, bundles["ultrasound"].preprocessor.size, limits))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundles", nargs="+")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)  # the same one thread per process that a Serve replica with num_cpus=1 gets
    uvicorn.run(make_app(a.bundles), host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
