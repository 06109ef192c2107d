"""Ray job entrypoints: `ray job submit --working-dir . -- python -m jobs.train jobs/specs/genomic.yaml`."""


def spec_argument(prog: str, doc: str, argv=None) -> str:
    """The job spec an entrypoint was given: a YAML file path or `--spec-json` text (one of them)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="job spec YAML file")
    p.add_argument("--spec-json", help="the spec inline, as JSON (what `medray submit` sends)")
    a = p.parse_args(argv)
    if bool(a.spec) == bool(a.spec_json):
        p.error("give a spec file or --spec-json (one of them)")
    return a.spec or a.spec_json
