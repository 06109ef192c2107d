"""The training job: read → split → fit preprocessing → Ray Train `TorchTrainer` → model bundle.

`train_loop_per_worker` runs on every Ray Train worker: it reads only its shard of the Ray
Datasets (`get_dataset_shard`), trains the DDP-wrapped model (`prepare_model`), evaluates the
validation shard (gathered across workers), and reports metrics with a checkpoint every epoch.
Re-running with the same run name and storage path resumes from the latest checkpoint
(Ray Train V2 hands it back through `ray.train.get_checkpoint()`).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medray.augment import augment_batch, check_spec, mix
from medray.bundle import write_bundle
from medray.calibration import calibrate, scale
from medray.console import StepTicker, describe_epoch, epoch_done, say
from medray.data import pipeline
from medray.data.dataset import skipped_summary, skipped_warning
from medray.errors import DataError, MedrayError
from medray.metrics import classification_metrics
from medray.models import Ensemble, build_model, preset_arch
from medray.report import write_report
from medray.split import flagged_rows, resolve_groups, split_indices
from medray.tasks import encode_labels, fit_preprocessor, load_preset
from medray import tracking
from medray.train_common import (STATE, ShardFeed, average_buffers, checkpoint_interval_s, fits_in_worker_memory,
                                 gather, prepare_model, resolve_run_storage, run_key, run_trainer, unwrap,
                                 write_checkpoint_files)

# ----------------------------------------------------------------------------- worker side
def _amp_settings(device: torch.device):
    """Mixed precision on GPU (bf16 where supported, else fp16 with loss scaling); none on CPU."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def step_quantiles(step_s: list[float]) -> list[float]:
    """p50, p90, p99 and max of an epoch's step times (seconds): uniform slowness or stalls."""
    if not step_s:
        return [0.0, 0.0, 0.0, 0.0]
    q = np.percentile(np.asarray(step_s), [50, 90, 99, 100])
    return [round(float(v), 4) for v in q]


def train_loop_per_worker(config: dict):
    import logging

    import ray.train
    import ray.train.torch

    for noisy in ("ray.train", "ray.data"):  # per-report INFO lines drown the progress lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)

    torch.manual_seed(config["seed"])  # identical initial weights on every worker
    model = build_model(config["model"], config["input_shape"], config["n_classes"])
    ensemble = isinstance(model, Ensemble)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    total_steps = config["epochs"] * config["steps_per_epoch"]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps) if total_steps > 1 else None

    # attempt: 1 for a fresh run, +1 every time the loop starts again from a checkpoint (a restarted
    # worker group, or a new run of the same name); the first epoch after a restart records where from.
    start_epoch, history, attempt, resumed_from = 1, [], 1, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") and state["total_steps"] == total_steps:
            scheduler.load_state_dict(state["scheduler"])
        elif scheduler is not None:  # more epochs asked for than before: continue the schedule's tail
            for _ in range(min(state["epoch"] * config["steps_per_epoch"], total_steps - 1)):
                scheduler.step()
        start_epoch, history = state["epoch"] + 1, state["history"]
        attempt, resumed_from = state.get("attempt", 1) + 1, state["epoch"]
        if rank == 0:
            print(f"[medray] resuming from checkpoint at epoch {state['epoch']}", flush=True)

    model = prepare_model(model)
    device = ray.train.torch.get_device()
    amp_dtype, use_scaler = _amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    weights = torch.tensor(config["class_weights"], dtype=torch.float32, device=device) if config["class_weights"] else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=config["label_smoothing"])
    bs = config["batch_size"]
    stats = config.get("augment_stats")  # the scaler's mean/std: sensor rotation works in sensor units
    stats = None if stats is None else [torch.tensor(v, dtype=torch.float32, device=device) for v in stats]
    feed = ShardFeed(ray.train.get_dataset_shard("train"), batch_size=bs, device=device, cache=config["cache"],
                     shuffle=True, seed=config["seed"] * 1000 + rank, input_shape=config["input_shape"])
    val_feed = ShardFeed(ray.train.get_dataset_shard("val"), batch_size=256, device=device, cache=config["cache"],
                         shuffle=False, seed=0, input_shape=config["input_shape"])

    last_report = time.time()
    for epoch in range(start_epoch, config["epochs"] + 1):
        t0 = time.time()
        model.train()
        rows, loss_sum, steps, first_step_s, step_s = 0, 0.0, 0, None, []
        tick = StepTicker(config if rank == 0 else {}, epoch)
        for x, y in feed.epoch(epoch):
            t_step = time.perf_counter()
            steps += 1
            tick(steps)
            if first_step_s is None:
                first_step_s = time.time() - t0
            x = augment_batch(x, config["augment"], config["input_shape"], gen, stats=stats)
            y2, lam = y, 1.0
            if config.get("mixup"):  # blended pairs, the loss blended alike
                x, y, y2, lam = mix(x, y, config["mixup"], gen)

            def criterion(z):
                return loss_fn(z, y) if lam == 1.0 else lam * loss_fn(z, y) + (1 - lam) * loss_fn(z, y2)

            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if ensemble:  # each member on its own loss: independent models, averaged when predicting
                    logits = model(x, members=True)
                    loss = torch.stack([criterion(z) for z in logits]).sum()
                else:
                    loss = criterion(model(x))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None and scheduler.last_epoch < total_steps - 1:
                scheduler.step()
            rows += len(y)
            loss_sum += float(loss.detach()) * len(y)
            step_s.append(time.perf_counter() - t_step)

        train_s, train_wait = time.time() - t0, feed.wait_s
        average_buffers(model)  # BatchNorm statistics of every shard, the same on every rank
        model.eval()
        probs, ys, val_loss = [], [], 0.0
        with torch.inference_mode():
            for vx, vy in val_feed.epoch(epoch):
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = unwrap(model)(vx).float()  # no DDP: shards may differ in length
                val_loss += float(torch.nn.functional.cross_entropy(logits, vy, reduction="sum"))
                probs.append(torch.softmax(logits, 1).cpu().numpy())
                ys.append(vy.cpu().numpy())
        k = config["n_classes"]
        mine = (np.concatenate(probs) if probs else np.zeros((0, k)), np.concatenate(ys) if ys else np.zeros(0, int),
                rows, loss_sum, val_loss, ray.get_runtime_context().get_node_id(), train_wait, train_s, steps,
                first_step_s or 0.0, time.time() - last_report, step_quantiles(step_s))
        parts = gather(mine)
        # Report (and checkpoint) every epoch that ends at least `checkpoint_interval_s` after the
        # previous report, and the last one: each report costs a controller round trip (~0.2 s), so
        # sub-second epochs are reported in groups. Decided on gathered figures: the same on every rank.
        due = epoch == config["epochs"] or max(p[10] for p in parts) >= config["checkpoint_interval_s"]
        p_all = np.concatenate([p[0] for p in parts])
        y_all = np.concatenate([p[1] for p in parts])
        rows_per_worker = [int(p[2]) for p in parts]
        train_loss = sum(p[3] for p in parts) / max(1, sum(rows_per_worker))
        # metrics on rank 0 only (its report and checkpoint are the ones kept): on a small node the
        # other ranks' copies of this work would only take CPU from rank 0
        val = classification_metrics(y_all, p_all, config["labels"]) if len(y_all) and rank == 0 else {}
        val_ece, calibration = val.get("ece"), None
        final = None
        if epoch == config["epochs"] and len(y_all) and rank == 0:  # the bundle's model: fit its temperature
            calibration = calibrate(p_all, y_all, seed=config["seed"])
            final = {"y": y_all, "probs": scale(p_all, calibration["temperature"]).astype(np.float32)}
            val = classification_metrics(y_all, final["probs"], config["labels"])
        metrics = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "val_loss": round(sum(p[4] for p in parts) / max(1, len(y_all)), 6),
            "val_accuracy": val.get("accuracy"),
            "val_balanced_accuracy": val.get("balanced_accuracy"),
            "val_macro_f1": val.get("macro_f1"),
            "val_auroc": val.get("auroc"),
            "val_ece": val_ece,  # before calibration
            "rows_per_worker": rows_per_worker,
            "node_per_worker": [p[5] for p in parts],
            "val_rows": int(len(y_all)),
            "world_size": world,
            "seconds": round(time.time() - t0, 2),
            "train_seconds": round(max(p[7] for p in parts), 3),
            "steps": int(parts[0][8]),
            "started_at": round(t0, 3),  # wall clock (benchmarks: seconds from the command to the first step)
            "first_step_s": round(max(p[9] for p in parts), 3),
            # share of the training steps' wall time spent waiting for the next batch (slowest worker)
            "data_wait_share": round(max(p[6] / max(p[7], 1e-9) for p in parts), 4),
            # per worker: seconds per training step (augment, forward, backward, gradient exchange,
            # optimiser; not the wait for data) at the median, 90th, 99th percentile and the slowest
            "step_s": [p[11] for p in parts],
            "attempt": attempt,
            "resumed_from_epoch": resumed_from if epoch == start_epoch else None,
        }
        history.append(metrics)
        if rank == 0:  # every epoch, reported or not: the driver's progress display, the log
            epoch_done(config, epoch, metrics)
            print(f"[medray] epoch {epoch}/{config['epochs']}  {describe_epoch(metrics)}  "
                  f"rows/worker {rows_per_worker}  {metrics['seconds']}s", flush=True)
        if rank == 0 and config.get("mlflow"):  # --mlflow: this epoch's figures to the run (medray/tracking.py)
            tracking.log_epoch(config["mlflow"], metrics)
        if not due:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint_files(tmp, {
                    "epoch": epoch,
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "total_steps": total_steps,
                    "history": history,
                    "val_metrics": val,
                    "calibration": calibration,
                    "val_predictions": final,  # the report's plots (bundle/report/)
                    "attempt": attempt,
                }, {"epoch": epoch, "fingerprint": config["fingerprint"]})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        last_report = time.time()


def train(
    task: str,
    data: str,
    out: str,
    *,
    model: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    workers: int = 2,
    gpu: bool = False,
    storage: str | None = None,
    name: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    group_column: str | None = None,
    label_column: str | None = None,
    max_failures: int = 2,
    address: str | None = None,
    placement_strategy: str = "PACK",
    skip_bad: bool = False,
    fold: tuple[int, int] | None = None,
    overrides: dict | None = None,
    mlflow: str | None = None,
    mlflow_experiment: str | None = None,
    mlflow_parent_run: str | None = None,
    log=say,
    label: str | None = None,
    exclude_train: str | None = None,
) -> dict:
    """Train one model as a Ray Train job and write its bundle to `out`. Returns bundle.json.

    Unreadable images, malformed rows and bad sequences in `data` fail before training, naming
    them; with `skip_bad` they are left out, logged, and counted in the bundle's `data.skipped`.
    `fold=(k, i)` validates on the i-th of k seeded folds (`medray cv`) instead of `val_fraction`.
    `overrides` ({"params": {...}, "preprocessing": {...}, "train": {...}, "ensemble": N}) change the preset's
    entries (model selection: `benchmarks/model_selection.py`). `mlflow` (a tracking URI) logs the run to
    MLflow, in experiment `mlflow_experiment` (default: the task), nested under `mlflow_parent_run`
    (`medray/tracking.py`). `label` names the run on the progress
    display (default: the task and model). `exclude_train` (COLUMN or FILE:COLUMN, as `group_column`)
    leaves the rows it flags (1/true/yes) out of the training split, after the split: validation
    and the folds stay as they were (e.g. BUSI's `label_conflict` images)."""
    preset = load_preset(task, model, overrides)
    recipe = dict(preset["train"])
    recipe.update({k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None})
    if recipe["epochs"] < 1 or recipe["batch_size"] < 1 or recipe["lr"] <= 0 or workers < 1:
        raise MedrayError("epochs, batch size and workers must be at least 1 and the learning rate positive")

    if mlflow:
        tracking.require_mlflow()  # before any work: the extra may not be installed
    from medray.ray_runtime import ensure_ray

    size = preset["preprocessing"].get("size", 128)
    source = pipeline.open_source(task, data, size=size, label_column=label_column, group_column=group_column)
    phases, t_phase = {}, time.time()
    ensure_ray(address)
    phases["ray_init_s"], t_phase = round(time.time() - t_phase, 2), time.time()
    keys = pipeline.read_keys(source, skip_bad=skip_bad)  # every item read and checked on the cluster
    phases["scan_s"], t_phase = round(time.time() - t_phase, 2), time.time()
    log(f"[medray] read and checked {len(keys)} items in {phases['scan_s']} s on {len(keys.nodes)} node(s)")
    if skipped_warning(keys):
        log(f"[medray] {skipped_warning(keys)}")
    if keys.labels is None:
        raise DataError(f"{data}: no labels found")
    labels = sorted(set(keys.labels.tolist()))
    if len(labels) < 2:
        raise DataError(f"{data}: only one class ({labels[0]!r}) in the labels; at least two are needed")
    groups = resolve_groups(group_column, keys)
    y = encode_labels(keys.labels, labels, data)
    tr_idx, va_idx = split_indices(keys.labels, groups, val_fraction, seed, fold=fold)
    excluded = 0
    if exclude_train:  # flagged rows out of training only, after the split
        flags = flagged_rows(exclude_train, keys)
        excluded = int(flags[tr_idx].sum())
        tr_idx = tr_idx[~flags[tr_idx]]
        log(f"[medray] left {excluded} training rows flagged by {exclude_train} out of training")
    if len(set(y[tr_idx])) < 2:
        raise DataError(f"{data}: the training split holds a single class; add data or change the split")
    prep = fit_preprocessor(task, source, keys, tr_idx, preset)  # streaming aggregates on the training rows
    try:
        check_spec(recipe.get("augment") or {}, prep.input_shape)
    except ValueError as e:  # e.g. the default's sensor rotation on series that are not xyz triplets
        recipe["augment"] = {k: v for k, v in recipe["augment"].items() if k != "rotate"}
        log(f"[medray] {e}: trained without it")
    phases["split_fit_s"] = round(time.time() - t_phase, 2)
    y_tr, y_va = y[tr_idx], y[va_idx]
    counts = np.bincount(y_tr, minlength=len(labels))
    class_weights = None
    if recipe.get("class_weights") == "balanced":
        class_weights = (len(y_tr) / (len(labels) * np.maximum(counts, 1))).round(6).tolist()

    arch = preset_arch(preset)
    tr_keys, va_keys = keys.keys[tr_idx], keys.keys[va_idx]
    fingerprint = pipeline.fingerprint(keys, {
        "labels": labels, "preprocessing": preset.get("preprocessing", {}), "task": task,
        "val": hashlib.sha256(np.sort(va_keys).tobytes()).hexdigest(),
        "features": source.feature_names,
        **({"exclude_train": [exclude_train, excluded]} if exclude_train else {})})
    name = name or f"{task}-{preset['name']}-{run_key(fingerprint, arch, recipe, seed, workers)[:10]}"
    storage = resolve_run_storage(storage, name, fingerprint, recipe["epochs"], log)

    per_worker = max(1, len(y_tr) // workers)
    steps_per_epoch = -(-per_worker // recipe["batch_size"])
    config = {
        "model": arch, "input_shape": prep.input_shape, "n_classes": len(labels), "labels": labels,
        "epochs": recipe["epochs"], "batch_size": recipe["batch_size"], "lr": recipe["lr"],
        "weight_decay": recipe.get("weight_decay", 0.0), "augment": recipe.get("augment") or {},
        "label_smoothing": recipe.get("label_smoothing", 0.0), "mixup": float(recipe.get("mixup", 0.0)),
        "augment_stats": [prep.mean.tolist(), prep.std.tolist()] if task == "exercise" else None,
        "class_weights": class_weights, "seed": seed, "fingerprint": fingerprint, "steps_per_epoch": steps_per_epoch,
        "cache": fits_in_worker_memory(-(-len(keys) // workers), prep.input_shape),
        "checkpoint_interval_s": checkpoint_interval_s(),
    }
    log(f"[medray] {task}: {len(keys)} rows from {data} → train {len(y_tr)} / validation {len(y_va)} "
        f"({'grouped by ' + group_column if groups is not None else 'stratified'}); model {preset['name']}; "
        f"{workers} worker(s) on {'GPU' if gpu else 'CPU'}; "
        f"{'shards cached in the workers' if config['cache'] else 'streaming every epoch'}; run {name!r} in {storage}")

    tracker = tracking.start(  # --mlflow: the run, its params and tags (a no-op without)
        mlflow, experiment=mlflow_experiment or task, run_name=name, parent_run_id=mlflow_parent_run, log=log,
        params={"task": task, "model": arch, "optimizer": "AdamW", "workers": workers, "gpu": gpu, "seed": seed,
                **{k: config[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "mixup",
                                          "augment", "class_weights")},
                "split": {"val_fraction": None if fold else val_fraction, "group_column": group_column,
                          **({"fold": fold[1], "folds": fold[0]} if fold else {})},
                "data": {"rows": len(keys), "train_rows": int(len(y_tr)), "val_rows": int(len(y_va))},
                "run_name": name, "storage": storage},
        tags={"medray.task": task, "medray.data": str(data), "medray.bundle": str(Path(out).absolute()),
              "medray.fingerprint": fingerprint})
    config["mlflow"] = tracker.worker
    label_index = {c: i for i, c in enumerate(labels)}
    datasets = {"train": pipeline.dataset(source, tr_keys, prep, label_index, shuffle_seed=seed),
                "val": pipeline.dataset(source, va_keys, prep, label_index)}
    with tracker.failing():  # the MLflow run ends FAILED if training does
        state, seconds = run_trainer(train_loop_per_worker, config, datasets, name=name, storage=storage,
                                     workers=workers, gpu=gpu, max_failures=max_failures,
                                     deterministic=config["cache"],  # cached shards: same rows, same order
                                     placement_strategy=placement_strategy, label=label or f"{task} {preset['name']}")
    meta = {
        "name": Path(out).name,
        "task": task,
        "model": arch,
        "training": {**{k: config[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "augment", "class_weights",
                                               "label_smoothing", "mixup")},
                     "optimizer": "AdamW", "schedule": "cosine per step", "seed": seed, "workers": workers, "gpu": gpu,
                     "epochs_trained": state["epoch"], "run_name": name, "storage_path": storage,
                     "seconds": seconds, "phases": phases},
        "preprocessing": prep.to_dict(),
        "labels": labels,
        "label_column": source.label_column if task == "exercise" else None,
        "input_shape": prep.input_shape,
        "input": _input_spec(task, prep),
        "data": {"source": str(data), "rows": len(keys), "train_rows": int(len(y_tr)), "val_rows": int(len(y_va)),
                 "class_counts_train": dict(zip(labels, counts.tolist())),
                 **({"excluded_from_training": {"spec": exclude_train, "rows": excluded}} if exclude_train else {}),
                 "split": {"val_fraction": None if fold else val_fraction, "group_column": group_column, "seed": seed,
                           **({"fold": fold[1], "folds": fold[0]} if fold else {})},
                 "fingerprint": fingerprint, "read_on_nodes": len(keys.nodes),
                 **({"skipped": skipped_summary(keys)} if skipped_summary(keys) else {})},
        "calibration": state.get("calibration"),
        "metrics": {"validation": state["val_metrics"], "history": state["history"]},
    }
    tracker.annotate(meta)  # training.mlflow: the run id
    final = state.get("val_predictions")
    path = write_bundle(out, state["model"], meta, extra=None if final is None else lambda folder, full: write_report(
        folder / "report", full, final["y"], final["probs"], history=state["history"]))
    log(f"[medray] bundle written to {path}")
    tracker.finish(meta, path)  # report images, bundle, final metrics
    return meta


def _input_spec(task: str, prep) -> dict:
    if task == "exercise":
        return {"type": "features", "feature_names": prep.feature_names, "layout": prep.layout}
    if task == "ultrasound":
        return {"type": "image", "formats": ["png", "jpeg", "bmp", "tiff", "dicom"], "color": "grayscale",
                "size": [prep.size, prep.size]}
    return {"type": "dna", "alphabet": "IUPAC nucleotide codes", "length": prep.length}


if __name__ == "__main__":  # pragma: no cover - convenience for `python -m medray.train`
    from medray.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
