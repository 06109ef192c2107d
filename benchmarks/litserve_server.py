"""The peer with dynamic batching: LitServe 0.2.19 (`pip install -e '.[bench]'`), one LitAPI per model.

Same routes (/v1/<task>/predict), the same validation (serve/inputs.py) and the same
`Bundle.predict` and answer as `plain_server.py`. LitServe's way: an API server process parses
the JSON body and queues it; one inference worker per model (CPU, one torch thread) takes up to
`--max-batch-size` queued requests (waiting at most `--batch-timeout` s for more), validates
each, runs the model once on all their instances together and answers each request with its
own rows. LitServe's defaults otherwise, e.g. one API server process per inference worker.

    python benchmarks/litserve_server.py --port 8200 BUNDLE_DIR…

JSON bodies only (LitServe parses them itself: no FASTA body, invalid JSON is a 500) and exercise
rows as lists of numbers (not objects keyed by feature name).
`/healthz` answers 200 once the first worker is ready (LitServe keys worker status by the last
path segment, "predict" for every route here), so a first request may wait for a model to load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import litserve as ls  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402
from starlette.responses import Response  # noqa: E402

from medray.bundle import META, load_bundle  # noqa: E402
from serve.inputs import (  # noqa: E402
    Limits,
    RequestError,
    decode_images,
    feature_rows,
    image_list,
    instance_list,  # the key/list/count checks that parse_features/parse_sequences/images_from_json start with
    prediction_objects,
    sequence_list,
)

# parse_features / parse_sequences / images_from_json after their JSON parse, which LitServe does
PARSERS = {
    "exercise": lambda doc, b, lim: feature_rows(instance_list(doc, "instances", lim), b.preprocessor.feature_names),
    "genomic": lambda doc, b, lim: sequence_list(instance_list(doc, "sequences", lim), lim),
    "ultrasound": lambda doc, b, lim: decode_images(image_list(instance_list(doc, "images", lim)),
                                                    b.preprocessor.size, lim),
}


def json_response(doc: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, headers=headers, media_type="application/json")


class ModelAPI(ls.LitAPI):
    """One model. A batch is a list of requests, each of one or more instances: `decode_request`
    notes each request's instance count (or its error) in its context, `batch` concatenates the
    valid ones, `unbatch` splits the probabilities back by those counts."""

    def __init__(self, task: str, bundle_dir: str, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         api_path=f"/v1/{task}/predict")
        self.task, self.bundle_dir, self.limits = task, bundle_dir, Limits()

    def setup(self, device):
        import torch

        torch.set_num_threads(1)  # as plain_server.py and a Serve replica with num_cpus=1
        self.bundle = load_bundle(self.bundle_dir)
        self.parse = PARSERS[self.task]

    def decode_request(self, request, context):
        try:
            x = self.parse(request, self.bundle, self.limits)
        except RequestError as e:  # this request alone fails, not the batch it is in
            context["error"], context["n"] = e, 0
            return None
        context["n"] = len(x)
        return x

    def batch(self, inputs):
        xs = [x for x in inputs if x is not None]
        if not xs:
            return None
        return np.concatenate(xs) if isinstance(xs[0], np.ndarray) else [s for x in xs for s in x]

    def predict(self, x):
        return None if x is None else self.bundle.predict(x)

    def unbatch(self, output, context):
        counts = [c["n"] for c in context]
        return [None] * len(counts) if output is None else np.split(output, np.cumsum(counts)[:-1])

    def encode_response(self, probs, context):
        if "error" in context:
            e = context["error"]
            return json_response({"error": e.code, "detail": e.detail}, e.status, e.headers)
        b = self.bundle
        return json_response({"predictions": prediction_objects(probs, b.labels),
                              "model": {"name": b.name, "version": b.version}})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundles", nargs="+")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--max-batch-size", type=int, default=64, help="requests per model call")
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds to wait for a batch to fill")
    p.add_argument("--api-servers", type=int, default=None,
                   help="HTTP processes (LitServe's default: one per inference worker)")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the task from bundle.json: the models load in the workers, not in this process and the forked HTTP ones
    apis = [ModelAPI(json.loads((Path(d) / META).read_text())["task"], d, a.max_batch_size, a.batch_timeout)
            for d in a.bundles]
    # timeout: seconds a request may wait in the queue, as long as wrk's own --timeout
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=1, timeout=60, healthcheck_path="/healthz")

    parent = os.getpid()

    def stop(signum, frame):  # SIGTERM: LitServe's own shutdown (Ctrl+C's), which stops its worker processes
        if os.getpid() != parent:  # a forked HTTP process (uvicorn re-raises SIGTERM once stopped): just exit
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    server.run(host=a.host, port=a.port, num_api_servers=a.api_servers, log_level="warning",
               generate_client_file=False, access_log=False)


if __name__ == "__main__":
    main()
