"""`medray tune`: search architecture and recipe with Ray Tune, each trial scored by grouped K-fold CV.

A trial is one configuration sampled from the task's `search:` space (medray/presets/TASK.yaml,
format below). Ray Tune runs each trial as a function trainable (Train V2 style, as Ray's "Tune +
Train" guide: the trial function builds and fits `TorchTrainer`s; Tune never wraps a trainer). The
trial trains the K folds of `medray cv` one after another through the same `medray.train.train`
(same seeded, grouped folds for every trial, so trials are compared on the same splits), and after
each fold reports the running mean of the score to Tune with `ray.tune.report`. ASHA
(`ASHAScheduler`, time attribute `folds_done`, grace period 1 fold, reduction factor 2) stops a trial
whose running mean after a rung's folds falls below the median of the trials that reached that rung.

The search space (`search:` in the preset):

    search:
      space:                      # every trial draws one value of each entry
        model: {choice: [poscnn, cnn1d]}        # the architecture (a preset entry under models:)
        ensemble: {choice: [1, 3]}              # members trained side by side (medray/models.py)
        train.lr: {loguniform: [0.0005, 0.005]} # SECTION.KEY: params / preprocessing / train
        params.dropout: {uniform: [0.2, 0.6]}
      per_model:                  # entries drawn for every trial, applied when that model is drawn
        poscnn: {params.channels: {choice: [16, 32, 64]}}

Distributions: `choice: [...]`, `grid: [...]` (every value, each × --trials), `uniform: [lo, hi]`,
`loguniform: [lo, hi]`, `randint: [lo, hi]` (both ends included); a plain value is fixed. Sampled
floats are rounded to 3 significant digits. What an entry does not set comes from the drawn model's
preset. Sampling is seeded (`--seed`), so the same command draws the same trials. The first trial is
the preset's default (`baseline_point`; `--no-baseline` draws it too), so ASHA's first rung and the
ranking measure every draw against it on the same folds.

Resources: the trial function is a Tune actor holding 1 CPU; each fold's Train V2 controller needs
none and its workers take `workers` CPUs in a placement group of their own (Train V2 does not use the
trial's); Ray Data's read and preprocessing tasks need free CPUs outside both. So concurrent trials
are capped at (cluster CPUs - 2) // (1 + workers) (and GPUs // workers with --gpu): on the local
instance of a 2-core machine (8 logical CPUs, medray/ray_runtime.py) two trials of 2 workers.

Re-running: the Tune experiment lives in `--out DIR/experiment/NAME`, NAME a hash of the search
(task, data, space, trials, folds, seed, metric, …): the same command again restores it (finished
trials are kept, unfinished ones start again). Ctrl+C stops the search cleanly: tune.json then holds
the trials so far (`finished: false`) and the command exits 130. Fold runs are named from their data, split and
config, as `medray cv`'s, so a restarted trial, a repeated config or a bigger search with the same
seed (its first trials are the same draws) finds its finished folds in --storage and trains nothing
again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import yaml
from ray.tune import Callback

from medray.cv import fold_metrics, summarise
from medray.errors import MedrayError

TRIAL_CPUS = 1  # the Tune trial actor (the fold loop, reading keys, fitting preprocessing, calibration)
DATA_HEADROOM_CPUS = 2  # kept free for Ray Data tasks, which run outside every placement group
METRICS = ("accuracy", "balanced_accuracy", "ece")
SECTIONS = ("params", "preprocessing", "train")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


# ----------------------------------------------------------------------------- the search space
def load_search(task: str) -> dict:
    """The `search:` block of presets/TASK.yaml: {"space": {...}, "per_model": {...}}."""
    from importlib import resources

    from medray.tasks import TASKS

    if task not in TASKS:
        raise MedrayError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    spec = yaml.safe_load(resources.files("medray.presets").joinpath(f"{task}.yaml").read_text())
    search = spec.get("search")
    if not search:
        raise MedrayError(f"presets/{task}.yaml declares no search space (a `search:` block)")
    return check_search(task, search, spec)


def check_search(task: str, search: dict, preset_file: dict | None = None) -> dict:
    """The search spec, checked: keys name a model, an ensemble size or SECTION.KEY, values a
    distribution this module knows; `per_model` names models of the preset."""
    if preset_file is None:
        from importlib import resources

        preset_file = yaml.safe_load(resources.files("medray.presets").joinpath(f"{task}.yaml").read_text())
    models = preset_file["models"]
    search = {"space": dict(search.get("space") or {}), "per_model": dict(search.get("per_model") or {})}
    unknown = set(search) - {"space", "per_model"}
    if unknown:
        raise MedrayError(f"search: unknown entries {sorted(unknown)} (space, per_model)")

    def check_entries(where, entries):
        for key, dist in entries.items():
            if key not in ("model", "ensemble") and key.split(".", 1)[0] not in SECTIONS or key.count(".") > 1:
                raise MedrayError(f"search {where}: {key!r} is not model, ensemble or SECTION.KEY "
                                  f"(SECTION: {', '.join(SECTIONS)})")
            if isinstance(dist, dict):
                if len(dist) != 1 or next(iter(dist)) not in KINDS:
                    raise MedrayError(f"search {where}: {key}: one of {', '.join(KINDS)} expected, got {dist}")
                kind, args = next(iter(dist.items()))
                if kind in ("uniform", "loguniform", "randint") and (not isinstance(args, list) or len(args) != 2):
                    raise MedrayError(f"search {where}: {key}: {kind} takes [low, high], got {args}")
                if kind in ("choice", "grid") and (not isinstance(args, list) or not args):
                    raise MedrayError(f"search {where}: {key}: {kind} takes a non-empty list, got {args}")
                values = args if kind in ("choice", "grid") else []
            else:
                values = [dist]
            if key == "model":
                bad = [v for v in values if v not in models]
                if bad:
                    raise MedrayError(f"search: model {bad} not in presets/{task}.yaml (models: {', '.join(models)})")

    check_entries("space", search["space"])
    for name, entries in search["per_model"].items():
        if name not in models:
            raise MedrayError(f"search per_model: {name!r} is not a model of presets/{task}.yaml")
        if "model" in entries:
            raise MedrayError(f"search per_model {name}: cannot set the model")
        check_entries(f"per_model {name}", entries)
    return search


def _dist(spec):
    from ray import tune

    if not isinstance(spec, dict):
        return spec
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(args)
    if kind == "grid":
        return tune.grid_search(args)
    if kind == "uniform":
        return tune.uniform(float(args[0]), float(args[1]))
    if kind == "loguniform":
        return tune.loguniform(float(args[0]), float(args[1]))
    return tune.randint(int(args[0]), int(args[1]) + 1)  # randint: both ends included


def param_space(search: dict) -> dict:
    """Tune's flat param space: `space` keys as they are, per-model keys as MODEL:KEY."""
    out = {key: _dist(spec) for key, spec in search["space"].items()}
    for name, entries in search["per_model"].items():
        out.update({f"{name}:{key}": _dist(spec) for key, spec in entries.items()})
    return out


def baseline_point(task: str, search: dict) -> dict | None:
    """The preset's default as a point of the space (the first trial, so every draw is measured
    against it on the same folds): each entry's value in the default model's preset (train()'s
    default where the preset has none). None when the space cannot express it (the default model
    not among the choices, a grid entry, a key the preset lacks)."""
    from medray.tasks import load_preset

    preset = load_preset(task)
    implicit = {"ensemble": 1, "train.label_smoothing": 0.0, "train.mixup": 0.0, "train.weight_decay": 0.0}
    point = {}
    entries = [(k, k, d) for k, d in search["space"].items()]
    entries += [(f"{preset['name']}:{k}", k, d) for k, d in search["per_model"].get(preset["name"], {}).items()]
    for tune_key, key, dist in entries:
        if isinstance(dist, dict) and "grid" in dist:
            return None
        if key == "model":
            value = preset["name"]
        elif key == "ensemble":
            value = preset.get("ensemble", 1)
        else:
            section, name = key.split(".", 1)
            value = preset.get(section, {}).get(name, implicit.get(key))
        if value is None:
            return None
        if isinstance(dist, dict) and "choice" in dist and value not in dist["choice"]:
            return None
        if not isinstance(dist, dict) and dist != value:  # a fixed entry other than the preset's
            return None
        point[tune_key] = value
    return point


def _round(v):
    if isinstance(v, float) and v != 0 and math.isfinite(v):
        return float(f"{v:.3g}")
    return v


def resolve(task: str, config: dict) -> dict:
    """What a trial's sampled config does: {"model", "overrides" (train()'s), "values" (the flat
    entries that apply, rounded: the table's and tune.json's config)}."""
    from medray.tasks import load_preset

    model = config.get("model") or load_preset(task)["name"]
    values = {"model": model}
    for key, v in config.items():
        if key == "model":
            continue
        if ":" in key:
            owner, key = key.split(":", 1)
            if owner != model:
                continue
        values[key] = _round(v.item() if hasattr(v, "item") else v)
    overrides: dict = {}
    for key, v in values.items():
        if key == "ensemble":
            overrides["ensemble"] = int(v)
        elif key != "model":
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = v
    return {"model": model, "overrides": overrides, "values": dict(sorted(values.items(), key=_order))}


def _order(item):
    key = item[0]
    return (0 if key == "model" else 1 if key == "ensemble" else 2, key)


def describe(values: dict) -> str:
    """`poscnn ensemble=3 lr=0.0021 dropout=0.45`: a trial's config on one line."""
    parts = [str(values.get("model"))]
    for key, v in values.items():
        if key != "model":
            parts.append(f"{key.split('.', 1)[-1]}={v}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- a trial
def cv_trial(config: dict, setup: dict) -> None:
    """One Tune trial: the K folds of grouped CV of the config, one `train()` (a Ray Train V2 job)
    after another; the running means to Tune after each fold (ASHA's time attribute: folds_done)."""
    import ray.tune
    from ray.data import DataContext

    from medray import console
    from medray.train import train
    from medray.train_common import DEFAULT_STORAGE

    console.set_mode(live=False, epoch_lines=False)  # this actor's output goes to the driver's log
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    trial_id = ray.tune.get_context().get_trial_id()
    applied = resolve(setup["task"], config)
    storage = setup["storage"] or DEFAULT_STORAGE
    if setup["concurrency"] > 1 and "://" not in storage:
        # two trials drawing the same config at the same time must not share run directories
        storage = str(Path(storage) / f"trial-{trial_id}")
    folds, metric = setup["folds"], setup["metric"]
    per_fold, started = [], time.time()
    with tempfile.TemporaryDirectory(prefix="medray-tune-") as tmp:
        for i in range(folds):
            meta = train(setup["task"], setup["data"], str(Path(tmp) / f"fold{i}"), model=applied["model"],
                         epochs=setup["epochs"], workers=setup["workers"], gpu=setup["gpu"], storage=storage,
                         seed=setup["seed"], fold=(folds, i), group_column=setup["group_column"],
                         label_column=setup["label_column"], max_failures=setup["max_failures"],
                         skip_bad=setup["skip_bad"], exclude_train=setup["exclude_train"],
                         overrides=copy.deepcopy(applied["overrides"]),
                         label=f"trial {trial_id} fold {i + 1}/{folds}")
            per_fold.append({"fold": i, **fold_metrics(meta),
                             "epochs_trained": meta["training"]["epochs_trained"],
                             "seconds": meta["training"]["seconds"]})
            summary = summarise(per_fold)
            report = {"score": summary[metric]["mean"], "folds_done": i + 1, "started": round(started, 2),
                      "ended": round(time.time(), 2), "seconds": round(time.time() - started, 1),
                      "fold_scores": [f[metric] for f in per_fold], "per_fold": json.dumps(per_fold)}
            for m in METRICS:
                if m in summary:
                    report[m] = summary[m]["mean"]
                    report[f"{m}_sd"] = summary[m]["sd"]
            ray.tune.report(report)


# ----------------------------------------------------------------------------- the search
def _absolute(path: str | None) -> str | None:
    """Local paths made absolute: a trial actor may run in another working directory."""
    if not path or "://" in path:
        return path
    if path == "id-prefix" or path.startswith("id-prefix:"):
        return path
    if ":" in path:  # FILE:COLUMN
        file, column = path.rsplit(":", 1)
        return f"{Path(file).expanduser().absolute()}:{column}" if Path(file).expanduser().exists() else path
    p = Path(path).expanduser()
    return str(p.absolute()) if p.exists() else path


def max_concurrency(workers: int, gpu: bool) -> int:
    """Trials that fit the cluster at once: each holds TRIAL_CPUS and its fold's `workers` CPUs (and
    GPUs), with DATA_HEADROOM_CPUS left for Ray Data tasks."""
    import ray

    res = ray.cluster_resources()
    n = int((res.get("CPU", 1) - DATA_HEADROOM_CPUS) // (TRIAL_CPUS + workers))
    if gpu:
        n = min(n, int(res.get("GPU", 0) // workers))
    return max(1, n)


def experiment_key(setup: dict, search: dict, trials: int, early_stop: bool, baseline: dict | None) -> str:
    keep = {k: setup[k] for k in ("task", "data", "folds", "seed", "metric", "epochs", "workers", "group_column",
                                  "label_column", "exclude_train", "skip_bad")}
    blob = json.dumps([keep, search, trials, early_stop, baseline], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def tune(task: str, data: str, out: str, *, trials: int = 8, folds: int = 5, seed: int = 0,
         metric: str = "accuracy", concurrency: int = 1, search: dict | None = None, early_stop: bool = True,
         baseline: bool = True,
         epochs: int | None = None, workers: int = 2, gpu: bool = False, storage: str | None = None,
         group_column: str | None = None, label_column: str | None = None, exclude_train: str | None = None,
         max_failures: int = 2, skip_bad: bool = False, address: str | None = None, quiet: bool = False) -> dict:
    """Search the task's `search:` space (or `search`) with Ray Tune: `trials` seeded draws, each
    scored by `folds`-fold CV (grouped by `group_column`), ASHA stopping weak trials after each fold
    (`early_stop`); with `baseline`, the first trial is the preset's default (`baseline_point`) and
    `trials` - 1 are drawn. `epochs` (tests, quick looks) overrides every trial's epochs. Writes
    OUT/tune.json; returns it: {"ranking": [...best first], "best": {..., "yaml"}, ...}. `quiet`: no
    progress lines (benchmarks)."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from medray.console import say
    from medray.ray_runtime import ensure_ray

    log = (lambda line: None) if quiet else say
    if folds < 2:
        raise MedrayError("--folds must be at least 2")
    if trials < 1 or concurrency < 1 or workers < 1:
        raise MedrayError("--trials, --concurrency and --workers must be at least 1")
    if metric not in ("accuracy", "balanced_accuracy"):
        raise MedrayError(f"--metric: accuracy or balanced_accuracy, got {metric!r}")
    if epochs is not None and epochs < 1:
        raise MedrayError("--epochs must be at least 1")
    default_space = search is None
    search = load_search(task) if default_space else check_search(task, search)
    out_dir = Path(out).expanduser().absolute()
    setup = {"task": task, "data": _absolute(data), "folds": folds, "seed": seed, "metric": metric,
             "epochs": epochs, "workers": workers, "gpu": gpu,
             # Tune runs each trial in a working directory of its own: a relative --storage would land there
             "storage": storage if not storage or "://" in storage else str(Path(storage).expanduser().absolute()),
             "group_column": _absolute(group_column), "label_column": label_column,
             "exclude_train": _absolute(exclude_train), "max_failures": max_failures, "skip_bad": skip_bad}

    ensure_ray(address)
    fit_now = max_concurrency(workers, gpu)
    if concurrency > fit_now:
        log(f"[medray] --concurrency {concurrency}: only {fit_now} trial(s) of {workers} worker(s) fit this cluster "
            f"at once ({TRIAL_CPUS} CPU per trial + {workers} per fold, {DATA_HEADROOM_CPUS} kept for Ray Data); "
            f"running {fit_now}")
        concurrency = fit_now
    setup["concurrency"] = concurrency
    point = baseline_point(task, search) if baseline else None
    if baseline and point is None:
        log(f"[medray] the preset's default of {task} is not a point of this space: no baseline trial")
    name = f"tune-{task}-{experiment_key(setup, search, trials, early_stop, point)}"
    experiment = out_dir / "experiment"
    trainable = ray.tune.with_resources(ray.tune.with_parameters(cv_trial, setup=setup), {"cpu": TRIAL_CPUS})
    scheduler = (ASHAScheduler(time_attr="folds_done", max_t=folds, grace_period=1, reduction_factor=2)
                 if early_stop else FIFOScheduler())
    lines = TrialLines(task, folds, metric, quiet=quiet)
    path = experiment / name
    restored = ray.tune.Tuner.can_restore(str(path))
    if restored:
        log(f"[medray] resuming the search in {path} (finished trials are kept)")
        tuner = ray.tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space(search),
            tune_config=ray.tune.TuneConfig(
                metric="score", mode="max", num_samples=trials, scheduler=scheduler,
                # the limit goes to the generator: Tune ignores max_concurrent_trials when given one
                search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=concurrency,
                                                 points_to_evaluate=[point] if point else None)),
            run_config=ray.tune.RunConfig(name=name, storage_path=str(experiment), verbose=0, callbacks=[lines],
                                          failure_config=ray.tune.FailureConfig(max_failures=0)),
        )
    space_name = f"presets/{task}.yaml `search:`" if default_space else "the given space"
    log(f"[medray] tune {task}: {trials} trial(s) from {space_name}, {folds}-fold CV "
        f"({'grouped by ' + group_column if group_column else 'stratified'}), scored by mean {metric}; "
        f"{'ASHA early stopping' if early_stop else 'no early stopping'}; {concurrency} at a time; "
        f"experiment {path}")
    t0 = time.time()
    grid = tuner.fit()
    result = summarise_search(task, grid, folds=folds, metric=metric,
                              baseline=resolve(task, point)["values"] if point else None)
    result.update({"data": setup["data"], "group_column": group_column, "seed": seed, "trials": trials,
                   "concurrency": concurrency, "epochs_override": epochs, "workers": workers,
                   "scheduler": ({"name": "ASHA", "time_attr": "folds_done", "max_t": folds, "grace_period": 1,
                                  "reduction_factor": 2} if early_stop else {"name": "FIFO"}),
                   "search": search, "baseline": point, "experiment": str(path), "resumed": restored,
                   "seconds": round(time.time() - t0, 1)})
    if result["finished"] and (not result["ranking"] or all(r["status"] == "error" for r in result["ranking"])):
        errors = [r["error"] for r in result["ranking"] if r.get("error")]
        raise MedrayError("every trial failed" + (f"; the first: {errors[0]}" if errors else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tune.json").write_text(json.dumps(result, indent=2, default=str))
    return result


class TrialLines(Callback):
    """A Tune callback on the driver: one line per fold of every trial, one when a trial ends. It is
    saved with the experiment (Tune pickles the run config), so it prints with `say` itself."""

    def __init__(self, task: str, folds: int, metric: str, quiet: bool = False):
        self.task, self.folds, self.metric, self.quiet, self.numbers = task, folds, metric, quiet, {}

    def _say(self, line: str) -> None:
        if not self.quiet:
            from medray.console import say

            say(line)

    def _name(self, trial) -> str:
        n = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        return f"trial {n} ({describe(resolve(self.task, trial.config)['values'])})"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        fold = (result.get("fold_scores") or [float("nan")])[-1]
        self._say(f"[medray] {self._name(trial)}: fold {result.get('folds_done')}/{self.folds} {self.metric} "
                  f"{fold:.3f}, mean {result['score']:.3f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get("folds_done", 0)
        if done < self.folds:
            self._say(f"[medray] {self._name(trial)}: stopped early by ASHA after {done} fold(s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"[medray] {self._name(trial)}: failed (the error is in tune.json and the log)")


def _tune_statuses(grid) -> list:
    """Each result's Tune trial status (TERMINATED, ERROR, or PENDING/RUNNING/PAUSED when the search
    was interrupted), in the grid's order (ResultGrid builds its results from these trials)."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    if trials is None or len(trials) != len(grid):
        return [None] * len(grid)
    return [t.status for t in trials]


def summarise_search(task: str, grid, *, folds: int, metric: str, baseline: dict | None = None) -> dict:
    """The ranking: trials that ran every fold first, by mean score (best first), then the ones
    ASHA stopped (more folds first, then by score), then unfinished (an interrupted search) and
    failed ones. `finished`: no trial left to run."""
    rows = []
    for r, tune_status in zip(grid, _tune_statuses(grid)):
        m = r.metrics or {}
        applied = resolve(task, r.config)
        done = int(m.get("folds_done") or 0)
        if r.error or tune_status == "ERROR":
            status = "error"
        elif done >= folds:
            status = "complete"
        elif tune_status in (None, "TERMINATED"):
            status = "stopped"  # ended before its last fold without an error: the scheduler stopped it
        else:
            status = "unfinished"
        per_fold = json.loads(m["per_fold"]) if m.get("per_fold") else []
        rows.append({"trial_id": m.get("trial_id") or Path(r.path).name, "status": status, "folds_done": done,
                     "baseline": baseline is not None and applied["values"] == baseline,
                     "score": m.get("score"), "config": applied["values"], "overrides": applied["overrides"],
                     "summary": summarise(per_fold) if per_fold else {}, "per_fold": per_fold,
                     "seconds": m.get("seconds"), "started": m.get("started"), "ended": m.get("ended"),
                     **({"error": str(r.error).splitlines()[0][:500]} if r.error else {})})
    order = {"complete": 0, "stopped": 1, "unfinished": 2, "error": 3}
    rows.sort(key=lambda r: (order[r["status"]], -r["folds_done"], -(r["score"] if r["score"] is not None else -1)))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    result = {"task": task, "folds": folds, "metric": metric,
              "finished": all(r["status"] in ("complete", "stopped", "error") for r in rows), "ranking": rows}
    best = rows[0] if rows and rows[0]["status"] in ("complete", "stopped") else None
    if best:
        result["best"] = {"trial_id": best["trial_id"], "config": best["config"], "summary": best["summary"],
                          "yaml": preset_snippet(task, best, folds=folds, metric=metric)}
    return result


def preset_snippet(task: str, row: dict, *, folds: int, metric: str) -> str:
    """The best config as presets/TASK.yaml lines (its model's whole entry, the figures as a comment)."""
    from medray.tasks import load_preset

    preset = load_preset(task, row["config"]["model"], row["overrides"])
    name = preset.pop("name")
    flow = lambda v: yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=10_000).strip()  # noqa: E731
    s = row["summary"]
    figures = ", ".join(f"{m} {s[m]['mean']:.3f} ± {s[m]['sd']:.3f}" for m in METRICS if m in s)
    lines = [f"# medray tune: best by mean {metric} over {folds}-fold CV ({row['folds_done']} folds): {figures}",
             f"default: {name}", "models:", f"  {name}:"]
    if preset.get("ensemble", 1) > 1:
        lines.append(f"    ensemble: {preset['ensemble']}")
    for section in SECTIONS:
        lines.append(f"    {section}: {flow(preset.get(section, {}))}")
    return "\n".join(lines)


def format_ranking(result: dict) -> str:
    """The ranked table: score and figures as mean ± sd over the folds, the config on one line."""
    metric = result["metric"]
    lines = [f"{result['task']}: {len(result['ranking'])} trial(s), {result['folds']}-fold CV, ranked by mean {metric}",
             f"{'#':>2}  {'accuracy':>15}  {'balanced acc.':>15}  {'ECE':>6}  {'folds':>5}  {'s':>6}  config"]
    cell = lambda s, m: f"{s[m]['mean']:.3f} ± {s[m]['sd']:.3f}" if m in s else "–"  # noqa: E731
    for r in result["ranking"]:
        s = r["summary"]
        ece = f"{s['ece']['mean']:.3f}" if "ece" in s else "–"
        note = {"stopped": "  (stopped by ASHA)", "unfinished": "  (unfinished)",
                "error": f"  (failed: {r.get('error', '')[:80]})"}.get(r["status"], "")
        note = ("  [preset default]" if r.get("baseline") else "") + note
        secs = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "–"
        lines.append(f"{r['rank']:>2}  {cell(s, 'accuracy'):>15}  {cell(s, 'balanced_accuracy'):>15}  {ece:>6}  "
                     f"{r['folds_done']:>2}/{result['folds']:<2}  {secs:>6}  {describe(r['config'])}{note}")
    return "\n".join(lines)
