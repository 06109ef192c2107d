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

`python -m jobs.train SPEC.yaml` runs it on the cluster it is started in (what `ray job submit`
and KubeRay's RayJob run); `medray submit SPEC.yaml --address http://HEAD:8265` submits that
entrypoint through `JobSubmissionClient`, with this checkout as the job's working_dir.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
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
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise MedrayError(f"{where}: unknown setting(s) {unknown} (known: {', '.join(SPEC_KEYS)})")
    for key, (kind, required) in SPEC_KEYS.items():
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
    if spec["task"] not in TASKS:
        raise MedrayError(f"{where}: task {spec['task']!r} is not one of {', '.join(TASKS)}")
    return spec


def run_spec(spec: dict) -> dict:
    """Run a spec's training on the Ray cluster this process belongs to (or a local one)."""
    from medray.train import train

    spec = load_spec(spec)
    kwargs = {k: v for k, v in spec.items() if k not in ("task", "data", "out", "runtime_env")}
    return train(spec["task"], spec["data"], spec["out"], **kwargs)


def entrypoint(spec: dict) -> str:
    """The command a cluster runs for `spec` (the spec travels inline, so it needs no file there)."""
    return "python -m jobs.train --spec-json " + shlex.quote(json.dumps(spec, sort_keys=True))


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
    for key in ("data", "out", "storage"):
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
    return client.submit_job(entrypoint=entrypoint(spec), runtime_env=runtime_env, submission_id=submission_id,
                             metadata={"medray_task": spec["task"], "medray_out": spec["out"]})


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
