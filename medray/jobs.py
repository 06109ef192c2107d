"""Training job specs and their submission to a Ray cluster (Ray Jobs SDK).

A job spec is a small YAML file (examples in jobs/specs/):

    task: genomic                       # exercise | ultrasound | genomic
    data: /mnt/data/splice.fasta        # local/NFS path or a URI (s3://, gs://, file://)
    out: /mnt/bundles/genomic           # bundle directory (shared storage on a cluster)
    storage: /mnt/runs                  # checkpoints: path or URI (s3://bucket/runs)
    name: genomic-poscnn                # run name: the same name resumes
    model: poscnn                       # optional; the rest are optional too
    epochs: 30
    workers: 2
    gpu: false
    group_column: id-prefix
    skip_bad: false                     # true: leave out unreadable images/rows/records

A **batch-inference** spec names a bundle instead of a task (examples: jobs/specs/predict-*.yaml):

    bundle: /mnt/bundles/ultrasound     # the model bundle (shared storage on a cluster)
    data: s3://archive/2026-12-01/      # what training reads: a path or a URI
    out: s3://scores/2026-12-01/        # a folder of Parquet parts (or NAME.parquet/.csv/.jsonl)
    actors: 4                           # optional: predictor actors, batch_size, gpu, format,
    skip_bad: true                      #   skip_bad (bad items listed in NAME.skipped.txt)

`python -m jobs.train SPEC.yaml` / `python -m jobs.predict SPEC.yaml` run a spec on the cluster
they are started in (what `ray job submit` and KubeRay's RayJob run); `medray submit SPEC.yaml
--address http://HEAD:8265` submits the matching entrypoint through `JobSubmissionClient`, with
this checkout as the job's working_dir.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

from medray.errors import MedrayError
from medray.tasks import TASKS

# spec key -> (type, required)
SPEC_KEYS = {
    "task": (str, True), "data": (str, True), "out": (str, True), "storage": (str, False), "name": (str, False),
    "model": (str, False), "epochs": (int, False), "batch_size": (int, False), "lr": (float, False),
    "workers": (int, False), "gpu": (bool, False), "seed": (int, False), "val_fraction": (float, False),
    "group_column": (str, False), "label_column": (str, False), "max_failures": (int, False),
    "placement_strategy": (str, False), "skip_bad": (bool, False), "runtime_env": (dict, False),
}
PREDICT_KEYS = {
    "bundle": (str, True), "data": (str, True), "out": (str, True), "format": (str, False),
    "actors": (int, False), "batch_size": (int, False), "gpu": (bool, False), "skip_bad": (bool, False),
    "runtime_env": (dict, False),
}
AGENT_WAIT_S = 60
# Not uploaded with the working_dir (Ray refuses packages over 100 MiB; none of these are code).
EXCLUDES = [".venv", ".git", ".medray-demo", "runs", "bundles", "**/__pycache__", "*.egg-info", "benchmarks/results"]


def load_spec(source: str | dict) -> dict:
    """A validated spec from a YAML file path, YAML/JSON text, or a dict."""
    if isinstance(source, dict):
        spec, where = dict(source), "job spec"
    else:
        p = Path(source)
        text, where = (p.read_text(), str(p)) if p.is_file() else (source, "job spec")
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MedrayError(f"{where}: not valid YAML: {e}") from None
        if not isinstance(spec, dict):
            raise MedrayError(f"{where}: expected a mapping of settings (is the path right?)")
    keys = PREDICT_KEYS if is_predict(spec) else SPEC_KEYS
    unknown = sorted(set(spec) - set(keys))
    if unknown:
        raise MedrayError(f"{where}: unknown setting(s) {unknown} (known: {', '.join(keys)})")
    for key, (kind, required) in keys.items():
        if key not in spec or spec[key] is None:
            if required:
                raise MedrayError(f"{where}: missing required setting {key!r}")
            spec.pop(key, None)
            continue
        value = spec[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = spec[key] = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MedrayError(f"{where}: {key!r} must be {kind.__name__}, got {value!r}")
    if is_predict(spec):
        if spec.get("format") not in (None, "parquet", "csv", "json"):
            raise MedrayError(f"{where}: 'format' must be parquet, csv or json, got {spec['format']!r}")
        return spec
    if spec["task"] not in TASKS:
        raise MedrayError(f"{where}: task {spec['task']!r} is not one of {', '.join(TASKS)}")
    return spec


def is_predict(spec: dict) -> bool:
    """A batch-inference spec (it names a bundle) rather than a training one (it names a task)."""
    return "bundle" in spec and "task" not in spec


def run_spec(spec: dict) -> dict:
    """Run a training spec on the Ray cluster this process belongs to (or a local one)."""
    from medray.train import train

    spec = load_spec(spec)
    kwargs = {k: v for k, v in spec.items() if k not in ("task", "data", "out", "runtime_env")}
    return train(spec["task"], spec["data"], spec["out"], **kwargs)


def run_predict_spec(spec: dict) -> dict:
    """Run a batch-inference spec on the Ray cluster this process belongs to (always on Ray
    Data, whatever the input's size: a job is for the cluster)."""
    from medray.bundle import load_bundle
    from medray.inference import predict

    spec = load_spec(spec)
    kwargs = {k: spec[k] for k in ("actors", "batch_size", "gpu", "skip_bad") if k in spec}
    return predict(load_bundle(spec["bundle"]), spec["data"], spec["out"], fmt=spec.get("format"), engine="ray",
                   **kwargs)


def entrypoint(spec: dict) -> str:
    """The command a cluster runs for `spec` (the spec travels inline, so it needs no file there)."""
    module = "jobs.predict" if is_predict(spec) else "jobs.train"
    return f"python -m {module} --spec-json " + shlex.quote(json.dumps(spec, sort_keys=True))


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise MedrayError(f"cannot reach the Ray dashboard at {address}: {e}") from None


def absolute_paths(spec: dict, base: str | Path = ".") -> dict:
    """Relative local paths of a spec made absolute (the job runs in an uploaded copy of the
    working_dir, not where it was submitted from); URIs and absolute paths are kept."""
    spec = dict(spec)
    base = Path(base).absolute()
    for key in ("data", "out", "storage", "bundle"):
        if key in spec and "://" not in spec[key] and not Path(spec[key]).is_absolute():
            spec[key] = str((base / spec[key]).resolve())
    group = spec.get("group_column")
    if group and ":" in group and not group.startswith("id-prefix"):
        file, column = group.rsplit(":", 1)
        if "://" not in file and not Path(file).is_absolute():
            spec["group_column"] = f"{(base / file).resolve()}:{column}"
    return spec


def submit(spec_path: str, address: str, working_dir: str = ".", pip: list[str] | None = None,
           submission_id: str | None = None) -> str:
    spec = absolute_paths(load_spec(spec_path))
    runtime_env = {"working_dir": str(Path(working_dir).absolute()), "excludes": list(EXCLUDES)}
    if pip:
        runtime_env["pip"] = list(pip)
    runtime_env.update(spec.pop("runtime_env", {}))
    client = _client(address)
    # A cluster that has just started answers "No available agent to submit job, please try again
    # later" until its job agent is up (seen here on a loaded machine): try again, for a minute.
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint(spec), runtime_env=runtime_env,
                                     submission_id=submission_id,
                                     metadata={"medray_task": spec.get("task", "predict"), "medray_out": spec["out"]})
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def follow(address: str, job_id: str, stream=sys.stdout) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    client = _client(address)

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            stream.write(lines)
            stream.flush()

    asyncio.run(tail())
    return str(client.get_job_status(job_id).value)


def list_jobs(address: str) -> list[dict]:
    out = []
    for j in _client(address).list_jobs():
        out.append({"id": j.submission_id or j.job_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
                    "start_time": j.start_time, "end_time": j.end_time})
    return out


def logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return _client(address).stop_job(job_id)
