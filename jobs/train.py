"""Training job entrypoint, run on a Ray cluster by `ray job submit`, `medray submit` or a KubeRay RayJob.

    python -m jobs.train jobs/specs/genomic.yaml
    python -m jobs.train --spec-json '{"task": "genomic", "data": "...", "out": "..."}'

Inside a Ray job, RAY_ADDRESS points at the cluster, so the training workers run on its nodes.
"""

import sys

from jobs import spec_argument
from medray.errors import MedrayError
from medray.jobs import load_spec, run_spec


def main(argv=None) -> int:
    source = spec_argument("python -m jobs.train", __doc__, argv)
    try:
        meta = run_spec(load_spec(source))
    except MedrayError as e:
        print(f"medray: error: {e}", file=sys.stderr)
        return 2
    print(f"[medray] job done: bundle {meta['name']} with validation accuracy "
          f"{meta['metrics']['validation'].get('accuracy')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
