"""Batch inference on Ray Data: `medray predict`/`evaluate` over a whole archive, on the cluster.

    open_source                training's readers list the input (paths, byte ranges, files)
      → scan_inputs            each item read, checked, decoded and preprocessed once, in
                               `map_batches` tasks over the nodes (training's scan, which also
                               keeps the inputs)
      → map_batches(Predictor) an actor pool: each actor takes the bundle from the object store
                               once and scores batches (`--gpu`: one GPU per actor)
      → materialize            the predictions (a few numbers per item, never the inputs) wait
                               in the object store while the driver checks the key table: a bad
                               item is named and fails the command before anything is written,
                               or with --skip-bad is left out and listed
      → write                  a folder: parts written in parallel by Ray Data (`write_parquet`,
                               `write_csv`, `write_json`) into a staging folder, moved into place;
                               one file or stdout: streamed in input order through the driver

The driver holds the key table (key, id, label, message per item) and, for one-file outputs, one
batch of predictions at a time. `truth_and_probs_on_ray` streams (label, probabilities) back for
the same metrics as the in-process path (`medray.metrics.classification_metrics`).
"""

from __future__ import annotations

import sys

import numpy as np

from medray.bundle import Bundle
from medray.data import pipeline
from medray.data.dataset import skipped_warning
from medray.errors import DataError
from medray.inference import prediction_columns, prediction_frame
from medray.tasks import encode_labels


class Predictor:
    """One actor of the pool: the bundle (weights; preprocessing already applied upstream) is
    fetched from the object store once, then every batch of read rows is scored. A row that
    failed to read (`_ok` false) is passed through unscored, with its message, for the driver."""

    PASS = tuple(c for c in pipeline.SCANNED_COLUMNS if c != "_id")  # `_id` becomes the `id` column

    def __init__(self, bundle, gpu: bool = False):
        import ray

        self.bundle = ray.get(bundle) if isinstance(bundle, ray.ObjectRef) else bundle
        if gpu:
            self.bundle.to("cuda")

    def __call__(self, batch: dict):
        ok = np.asarray(batch["_ok"], dtype=bool)
        probs = np.full((len(ok), len(self.bundle.labels)), np.nan, np.float32)
        if ok.any():
            probs[ok] = self.bundle.predict_arrays(batch["x"][ok], batch_size=int(ok.sum()))
        df = prediction_frame(self.bundle, batch["_id"], probs)
        for c in self.PASS:
            df[c] = batch[c]
        return df


def default_actors(gpu: bool) -> int:
    """One actor per GPU with --gpu; else one per 4 logical CPUs of the cluster (1..16), leaving
    CPUs to the read and preprocess tasks."""
    import ray

    res = ray.cluster_resources()
    if gpu:
        return max(1, int(res.get("GPU", 1)))
    return max(1, min(16, int(res.get("CPU", 1)) // 4))


def _predictions(bundle: Bundle, data: str, *, skip_bad: bool, address, actors, batch_size: int, gpu: bool,
                 with_truth: bool, in_order: bool = False):
    """(scored rows of the kept items as a Ray Dataset, key table) for `data`: every item read,
    decoded and preprocessed once (`pipeline.scan_inputs`), scored by the actor pool, the
    predictions (a few numbers per item) kept in the object store until the bad items are known:
    without --skip-bad a bad item fails the command before anything is written."""
    import ray
    from ray.data import ActorPoolStrategy

    from medray.ray_runtime import ensure_ray

    ensure_ray(address)
    pre = bundle.preprocessor
    source = pipeline.open_source(bundle.task, data, size=getattr(pre, "size", 128),
                                  label_column=bundle.meta.get("label_column"), require_labels=with_truth,
                                  feature_names=getattr(pre, "feature_names", None))
    pool = ActorPoolStrategy(size=actors or default_actors(gpu))
    scored = pipeline.scan_inputs_dataset(source, pre).map_batches(
        Predictor, batch_size=batch_size, batch_format="numpy", compute=pool,
        fn_constructor_kwargs={"bundle": ray.put(bundle), "gpu": gpu}, num_gpus=1 if gpu else 0,
        scheduling_strategy="SPREAD")  # actors over the nodes, as the reads are
    if in_order:
        _in_order(scored)
    scored = scored.materialize()
    scanned = scored.select_columns(list(Predictor.PASS) + ["id"]).to_pandas().rename(columns={"id": "_id"})
    keys = pipeline.read_keys(source, skip_bad=skip_bad, require_labels=with_truth, scanned=scanned,
                              rest="evaluate on the rest" if with_truth else "predict the rest")
    if with_truth:
        if keys.labels is None:
            raise DataError(f"{data}: no labels to evaluate against")
        encode_labels(np.unique(keys.labels), bundle.labels, data)  # labels the model does not know: named here
    if len(keys) < len(scanned):  # bad items skipped (or a whole-file problem's marker row)
        scored = scored.map_batches(_keep, fn_kwargs={"wanted": ray.put(np.sort(keys.keys))}, batch_format="pandas")
    drop = [c for c in Predictor.PASS if not (with_truth and c == "_label")]
    return scored.drop_columns(drop), keys


def _keep(df, wanted):
    return df[pipeline.kept(df["_key"].to_numpy(np.int64), pipeline.resolve_ref(wanted))]


def _in_order(ds):
    """`ds` with its rows coming back in input order (one-file outputs, stdout): the executor
    runs with this dataset's own context."""
    ds.context.execution_options.preserve_order = True
    return ds


def predict_on_ray(bundle: Bundle, data: str, target, *, skip_bad: bool = False, address=None, actors=None,
                   batch_size: int = 256, gpu: bool = False, stream=sys.stdout) -> dict:
    from medray import outputs

    single = target is None or target.single
    ds, keys = _predictions(bundle, data, skip_bad=skip_bad, address=address, actors=actors,
                            batch_size=batch_size, gpu=gpu, with_truth=False, in_order=single)
    if keys.skipped:
        print(f"[medray] {skipped_warning(keys)}", file=sys.stderr)
    cols = prediction_columns(bundle)
    if single:
        batches = _in_order(ds).iter_batches(batch_size=None, batch_format="pandas")
        rows = (outputs.write_stream("csv", batches, stream, cols) if target is None
                else outputs.write_file(target, batches, cols))
    else:
        write = {"parquet": ds.write_parquet, "csv": ds.write_csv, "json": ds.write_json}[target.fmt]
        outputs.write_folder(target, lambda staged: write(staged, filesystem=target.filesystem))
        rows = len(keys)
    return {"rows": rows, "skipped": keys.skipped, "engine": "ray", "read_on_nodes": keys.nodes}


def truth_and_probs_on_ray(bundle: Bundle, data: str, *, skip_bad: bool = False, address=None, actors=None,
                           batch_size: int = 256, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(true class indices, probabilities) of labelled `data`, scored on the cluster."""
    ds, keys = _predictions(bundle, data, skip_bad=skip_bad, address=address, actors=actors,
                            batch_size=batch_size, gpu=gpu, with_truth=True)
    if keys.skipped:
        print(f"[medray] {skipped_warning(keys)}", file=sys.stderr)
    cols = [f"p_{c}" for c in bundle.labels]
    ys, ps = [], []
    for b in ds.select_columns([*cols, "_label"]).iter_batches(batch_size=None, batch_format="numpy"):
        ys.append(encode_labels([str(v).strip() for v in b["_label"]], bundle.labels, data))
        ps.append(np.stack([b[c] for c in cols], axis=1))
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    probs = np.concatenate(ps) if ps else np.zeros((0, len(cols)))
    return y, probs
