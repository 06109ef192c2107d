"""Experiment tracking with MLflow: `medray train|cv --mlflow URI [--mlflow-experiment NAME]`.

Off unless a tracking URI is given, and MLflow is imported only then (it is an optional extra:
`pip install 'medray[mlflow]'`). What goes where:

- the driver, before training: the MLflow run (experiment: `--mlflow-experiment`, default the
  task name), its params (task, architecture, recipe, workers, seed, split, data sizes) and tags
  (medray version, data path, bundle path, Ray run name); the run id is printed and recorded in
  the bundle's `training.mlflow`.
- rank 0 of the Ray Train job, every epoch: the epoch's figures (`EPOCH_METRICS`) with
  step = epoch. The workers are other processes (other nodes, on a cluster), so the tracking URI
  and the run id travel in the train loop's config; a relative sqlite path or store folder is
  made absolute on the driver first.
- the driver, after the bundle is written: any epoch that rank 0 could not log (MLflow not
  importable on that node, a sqlite file not on that node's disk, a tracking server that did not
  answer, epochs restored from a checkpoint by a resumed run), the final validation figures
  (`final_*`), the report images (`report/`), the whole bundle (`bundle/`), and the run's end
  (FINISHED; FAILED when training fails).

`medray cv` makes one parent run for the command and one nested run per fold (its
`mlflow.parentRunId` tag); the parent gets the cross-validated means and sds (`cv_<metric>_mean`,
`cv_<metric>_sd`) and, with `--out`, cv.json.

Artifacts of a sqlite store go beside the database, in `mlartifacts/<experiment>/` of its
folder, not in MLflow's default `./mlruns` of whatever folder the command ran in; an experiment
that already exists keeps its own artifact location, and a tracking server decides its own.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import json
import re
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from medray.errors import MedrayError

INSTALL_HINT = "pip install 'medray[mlflow]'"
# the per-epoch figures logged (keys of the epoch's metrics in train.py; step = the epoch)
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_auroc",
                 "val_ece", "seconds", "data_wait_share")
FINAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "ece")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
_open_runs: dict[str, tuple[str, str]] = {}  # run id -> tracking URI, run name: marked FAILED if left open at exit


def require_mlflow():
    """The mlflow module, or a MedrayError saying how to install it."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient  # noqa: F401  (what medray uses; a broken install fails here)
    except ImportError as e:
        raise MedrayError(f"--mlflow needs MLflow, which is not installed ({e}); install it with: "
                          f"{INSTALL_HINT}") from None
    return mlflow


def resolve_uri(uri: str) -> str:
    """The tracking URI as every process can use it: a relative sqlite path (`sqlite:///runs.db`)
    or a store folder (`mlruns`, `file:mlruns`) made absolute against the current folder (and the
    sqlite file's folder created); server URLs and other databases unchanged."""
    uri = uri.strip()
    if not uri:
        raise MedrayError("--mlflow: empty tracking URI")
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            raise MedrayError(f"--mlflow {uri}: give a database file, sqlite:///runs.db (relative) or "
                              "sqlite:////abs/path/runs.db; an in-memory database is not shared with the workers")
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        if not path or path == ":memory:":
            raise MedrayError(f"--mlflow {uri}: an in-memory sqlite database is not shared with the workers; "
                              "give a file, e.g. sqlite:///runs.db")
        db = Path(path).expanduser().absolute()
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}{sep}{query}"
    if uri.startswith("file:") and not uri.startswith("file:/"):  # file:relative/folder
        return Path(uri[len("file:"):]).expanduser().absolute().as_uri()
    if uri.split(":")[0] in ("databricks", "databricks-uc", "uc"):
        return uri
    if "://" not in uri and ":" not in uri.split("/")[0]:  # a plain folder: MLflow's file store
        return str(Path(uri).expanduser().absolute())
    return uri


def _local_store(uri: str) -> Path | None:
    """The file a sqlite URI names, or the folder of a file store; None for a server or other database."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].partition("?")[0])
    if uri.startswith("file://"):
        return Path(urlsplit(uri).path)
    if "://" not in uri and uri.startswith("/"):
        return Path(uri)
    return None


def display_uri(uri: str) -> str:
    """The URI without a password (what is printed and kept in bundle.json)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite database (`mlartifacts/<experiment>`);
    None (MLflow's choice: the store folder, or the server's) otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (_local_store(uri).parent / "mlartifacts" / safe).as_uri()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
            out[key] = text[:MAX_PARAM_CHARS]
    return out


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class Tracker:
    """One MLflow run, seen from the driver (`start`); see the module docstring."""

    def __init__(self, uri: str, experiment: str, experiment_id: str, run_id: str, run_name: str,
                 parent_run_id: str | None, log):
        self.uri, self.experiment, self.experiment_id = uri, experiment, experiment_id
        self.run_id, self.run_name, self.parent_run_id, self.log = run_id, run_name, parent_run_id, log

    @property
    def worker(self) -> dict:
        """What the Ray Train workers need to log to this run (`log_epoch`): the train loop's config["mlflow"]."""
        return {"uri": self.uri, "run_id": self.run_id}

    def annotate(self, meta: dict) -> None:
        """Record the run in bundle.json (`training.mlflow`)."""
        meta.setdefault("training", {})["mlflow"] = {
            "tracking_uri": display_uri(self.uri), "experiment": self.experiment,
            "experiment_id": self.experiment_id, "run_id": self.run_id,
            **({"parent_run_id": self.parent_run_id} if self.parent_run_id else {})}

    @contextlib.contextmanager
    def failing(self):
        """Mark the run FAILED (KILLED on Ctrl-C) when the block raises."""
        try:
            yield self
        except BaseException as e:
            self.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise

    def end(self, status: str = "FINISHED") -> None:
        if _open_runs.pop(self.run_id, None) is None:
            return
        try:
            _client(self.uri).set_terminated(self.run_id, status=status)
        except Exception as e:  # the tracking store is down: training's outcome stands
            self.log(f"[medray] MLflow: could not mark run {self.run_id} {status}: {type(e).__name__}: {e}")

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if _number(v)]
        if batch:
            _client(self.uri).log_batch(self.run_id, metrics=batch)

    def finish(self, meta: dict, bundle: str | Path) -> None:
        """After the bundle is written: epochs rank 0 did not log, final metrics, report and bundle
        artifacts; the run ends FINISHED."""
        try:
            self._log_results(meta, Path(bundle))
        except Exception as e:
            self.end("FAILED")
            raise MedrayError(f"MLflow run {self.run_id} at {display_uri(self.uri)}: logging the results failed "
                              f"(the bundle is written, {bundle}): {type(e).__name__}: {e}") from e
        self.end("FINISHED")
        self.log(f"[medray] MLflow run {self.run_id} finished: metrics, report and bundle logged "
                 f"(experiment {self.experiment!r}, {display_uri(self.uri)})")

    def _log_results(self, meta: dict, bundle: Path) -> None:
        client = _client(self.uri)
        history = (meta.get("metrics") or {}).get("history") or []
        # epochs rank 0 did not log (see log_epoch), and those a resumed run restored from a checkpoint
        logged = {m.step for m in client.get_metric_history(self.run_id, EPOCH_METRICS[0])}
        for h in history:
            if h.get("epoch") not in logged:
                self.log_metrics(epoch_metrics(h), step=h["epoch"])
        val, cal = (meta.get("metrics") or {}).get("validation") or {}, meta.get("calibration") or {}
        final = {f"final_{k}": val.get(k) for k in FINAL_METRICS}
        final.update({"final_ece_uncalibrated": cal.get("ece_uncalibrated"),
                      "calibration_temperature": cal.get("temperature"),
                      "training_seconds": (meta.get("training") or {}).get("seconds")})
        self.log_metrics(final, step=len(history))
        if (bundle / "report").is_dir():
            client.log_artifacts(self.run_id, str(bundle / "report"), "report")
        client.log_artifacts(self.run_id, str(bundle), "bundle")


    def finish_cv(self, result: dict) -> None:
        """`medray cv`'s parent run: the summary as `cv_<metric>_mean` / `cv_<metric>_sd`, and cv.json."""
        try:
            self.log_metrics({f"cv_{m}_{k}": s[k] for m, s in result["summary"].items() for k in ("mean", "sd")})
            if (result.get("pooled") or {}).get("ece") is not None:
                self.log_metrics({"cv_ece_pooled": result["pooled"]["ece"]})
            _client(self.uri).log_dict(self.run_id, result, "cv.json")
        except Exception as e:
            self.end("FAILED")
            raise MedrayError(f"MLflow run {self.run_id} at {display_uri(self.uri)}: logging the cross-validation "
                              f"summary failed: {type(e).__name__}: {e}") from e
        self.end("FINISHED")
        self.log(f"[medray] MLflow run {self.run_id} (cross-validation) finished; one nested run per fold")


class _NoTracking:
    """`start(None, …)`: every hook does nothing."""

    worker = None
    run_id = None

    def annotate(self, meta):
        pass

    @contextlib.contextmanager
    def failing(self):
        yield self

    def end(self, status="FINISHED"):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def finish(self, meta, bundle):
        pass

    def finish_cv(self, result):
        pass


NO_TRACKING = _NoTracking()


def start(uri: str | None, *, experiment: str, run_name: str, params: dict | None = None, tags: dict | None = None,
          parent_run_id: str | None = None, log=print):
    """Open an MLflow run on the driver (NO_TRACKING without a URI). `params` may nest
    (flattened with dots); `tags` are added to medray's own (version, user)."""
    if not uri:
        return NO_TRACKING
    require_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import (MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE,
                                          MLFLOW_USER)

    from medray import __version__

    uri = resolve_uri(uri)
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                experiment_id = client.create_experiment(experiment,
                                                         artifact_location=_artifact_location(uri, experiment))
            except MlflowException:  # created meanwhile by another command
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise MedrayError(f"MLflow experiment {experiment!r} at {display_uri(uri)} is deleted; restore it "
                                  "or pick another --mlflow-experiment")
            experiment_id = exp.experiment_id
        all_tags = {"medray.version": __version__, MLFLOW_SOURCE_NAME: "medray", MLFLOW_SOURCE_TYPE: "LOCAL",
                    **({MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {}), **(tags or {})}
        with contextlib.suppress(Exception):
            all_tags[MLFLOW_USER] = getpass.getuser()
        run = client.create_run(experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name)
        run_id = run.info.run_id
        _open_runs[run_id] = (uri, run_name)
        tracker = Tracker(uri, experiment, experiment_id, run_id, run_name, parent_run_id, log)
        with tracker.failing():
            if params:
                from mlflow.entities import Param

                flat = _flatten(params)
                items = [Param(k, v) for k, v in flat.items()]
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
                    client.log_batch(run_id, params=items[i:i + 100])
    except MedrayError:
        raise
    except Exception as e:  # MLflow's errors, an unreachable server, an unreadable database
        raise MedrayError(f"--mlflow {display_uri(uri)}: cannot open an MLflow run: {type(e).__name__}: "
                          f"{getattr(e, 'message', None) or e}") from None
    log(f"[medray] MLflow run {run_id} ({run_name}) in experiment {experiment!r} at {display_uri(uri)}")
    return tracker


def epoch_metrics(metrics: dict) -> dict:
    """The figures of one epoch that are logged (EPOCH_METRICS that have a value)."""
    return {k: metrics[k] for k in EPOCH_METRICS if _number(metrics.get(k))}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_warned: set[str] = set()


def log_epoch(target: dict | None, metrics: dict) -> None:
    """Rank 0 of the Ray Train job, every epoch: this epoch's figures to the run in `target`
    (`Tracker.worker`), step = the epoch. Never fails training: an epoch that cannot be logged
    here is logged by the driver at the end (`Tracker.finish`), with one warning per process."""
    if not target:
        return
    try:
        store = _local_store(target["uri"])
        if store is not None and not store.exists():
            raise FileNotFoundError(f"{store} is not on this node")
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(metrics["epoch"])) for k, v in epoch_metrics(metrics).items()]
        _client(target["uri"]).log_batch(target["run_id"], metrics=batch)
    except Exception as e:
        if target["run_id"] not in _warned:
            _warned.add(target["run_id"])
            print(f"[medray] MLflow: epoch {metrics.get('epoch')} not logged from the worker "
                  f"({type(e).__name__}: {e}); the driver logs the epochs at the end", flush=True)


@atexit.register
def _fail_open_runs() -> None:
    """Runs still open when the process exits (an error between start and finish) end FAILED."""
    for run_id, (uri, _) in list(_open_runs.items()):
        _open_runs.pop(run_id, None)
        with contextlib.suppress(Exception):
            _client(uri).set_terminated(run_id, status="FAILED")
