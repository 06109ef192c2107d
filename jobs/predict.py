"""Batch-inference job entrypoint, run on a Ray cluster by `ray job submit`, `medray submit` or a KubeRay RayJob.

    python -m jobs.predict jobs/specs/predict-ultrasound.yaml
    python -m jobs.predict --spec-json '{"bundle": "...", "data": "...", "out": "..."}'

Inside a Ray job, RAY_ADDRESS points at the cluster: the input is read and scored on its nodes.
"""

import json
import sys

from jobs import spec_argument
from medray.errors import MedrayError
from medray.jobs import is_predict, load_spec, run_predict_spec


def main(argv=None) -> int:
    source = spec_argument("python -m jobs.predict", __doc__, argv)
    try:
        spec = load_spec(source)
        if not is_predict(spec):
            raise MedrayError("not a batch-inference spec (it names a task, not a bundle): use `python -m jobs.train`")
        summary = run_predict_spec(spec)
    except MedrayError as e:
        print(f"medray: error: {e}", file=sys.stderr)
        return 2
    print(f"[medray] job done: {json.dumps(summary)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
