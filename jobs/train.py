"""Training job entrypoint, run on a Ray cluster by `ray job submit`, `medray submit` or a KubeRay RayJob.

    python -m jobs.train jobs/specs/genomic.yaml
    python -m jobs.train --spec-json '{"task": "genomic", "data": "...", "out": "..."}'

Inside a Ray job, RAY_ADDRESS points at the cluster, so the training workers run on its nodes.
"""

import argparse
import sys

from medray.errors import MedrayError
from medray.jobs import load_spec, run_spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="job spec YAML file")
    p.add_argument("--spec-json", help="the spec inline, as JSON (what `medray submit` sends)")
    a = p.parse_args(argv)
    if bool(a.spec) == bool(a.spec_json):
        p.error("give a spec file or --spec-json (one of them)")
    try:
        meta = run_spec(load_spec(a.spec or a.spec_json))
    except MedrayError as e:
        print(f"medray: error: {e}", file=sys.stderr)
        return 2
    print(f"[medray] job done: bundle {meta['name']} with validation accuracy "
          f"{meta['metrics']['validation'].get('accuracy')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
