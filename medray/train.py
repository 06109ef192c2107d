"""The training job: read → split → fit preprocessing → Ray Train `TorchTrainer` → model bundle.

`train_loop_per_worker` runs on every Ray Train worker: it reads only its shard of the Ray
Datasets (`get_dataset_shard`), trains the DDP-wrapped model (`prepare_model`), evaluates the
validation shard (gathered across workers), and reports metrics with a checkpoint every epoch.
Re-running with the same run name and storage path resumes from the latest checkpoint
(Ray Train V2 hands it back through `ray.train.get_checkpoint()`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from medray.augment import augment_batch
from medray.bundle import write_bundle
from medray.errors import DataError, MedrayError
from medray.metrics import classification_metrics
from medray.models import build_model
from medray.split import resolve_groups, split_indices
from medray.data.dataset import skipped_summary, skipped_warning
from medray.data.location import localize
from medray.tasks import encode_labels, fit_preprocessor, load_preset, read_training_data

STATE = "state.pt"
CHECKPOINT_META = "checkpoint.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of registered checkpoints
DEFAULT_STORAGE = os.environ.get("MEDRAY_STORAGE", os.path.expanduser("~/medray-runs"))


# ----------------------------------------------------------------------------- worker side
def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _amp_settings(device: torch.device):
    """Mixed precision on GPU (bf16 where supported, else fp16 with loss scaling); none on CPU."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def _gather(obj):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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

    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    amp_dtype, use_scaler = _amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    weights = torch.tensor(config["class_weights"], dtype=torch.float32, device=device) if config["class_weights"] else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    bs = config["batch_size"]

    for epoch in range(start_epoch, config["epochs"] + 1):
        t0 = time.time()
        model.train()
        rows, loss_sum = 0, 0.0
        for batch in train_shard.iter_torch_batches(batch_size=bs, device=device, local_shuffle_buffer_size=4 * bs,
                                                    local_shuffle_seed=config["seed"] + epoch * 7919 + rank):
            x, y = batch["x"], batch["y"]
            x = augment_batch(x, config["augment"], config["input_shape"], gen)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None and scheduler.last_epoch < total_steps - 1:
                scheduler.step()
            rows += len(y)
            loss_sum += float(loss.detach()) * len(y)

        model.eval()
        probs, ys, val_loss = [], [], 0.0
        with torch.inference_mode():
            for batch in val_shard.iter_torch_batches(batch_size=256, device=device):
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(batch["x"]).float()
                val_loss += float(torch.nn.functional.cross_entropy(logits, batch["y"], reduction="sum"))
                probs.append(torch.softmax(logits, 1).cpu().numpy())
                ys.append(batch["y"].cpu().numpy())
        k = config["n_classes"]
        mine = (np.concatenate(probs) if probs else np.zeros((0, k)), np.concatenate(ys) if ys else np.zeros(0, int),
                rows, loss_sum, val_loss, ray.get_runtime_context().get_node_id())
        parts = _gather(mine)
        p_all = np.concatenate([p[0] for p in parts])
        y_all = np.concatenate([p[1] for p in parts])
        rows_per_worker = [int(p[2]) for p in parts]
        train_loss = sum(p[3] for p in parts) / max(1, sum(rows_per_worker))
        val = classification_metrics(y_all, p_all, config["labels"]) if len(y_all) else {}
        metrics = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "val_loss": round(sum(p[4] for p in parts) / max(1, len(y_all)), 6),
            "val_accuracy": val.get("accuracy"),
            "val_balanced_accuracy": val.get("balanced_accuracy"),
            "val_macro_f1": val.get("macro_f1"),
            "val_auroc": val.get("auroc"),
            "rows_per_worker": rows_per_worker,
            "node_per_worker": [p[5] for p in parts],
            "val_rows": int(len(y_all)),
            "world_size": world,
            "seconds": round(time.time() - t0, 2),
            "attempt": attempt,
            "resumed_from_epoch": resumed_from if epoch == start_epoch else None,
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint_files(tmp, {
                    "epoch": epoch,
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "total_steps": total_steps,
                    "history": history,
                    "val_metrics": val,
                    "attempt": attempt,
                }, {"epoch": epoch, "fingerprint": config["fingerprint"]})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                print(f"[medray] epoch {epoch}/{config['epochs']}  loss {train_loss:.4f}  "
                      f"val_loss {metrics['val_loss']:.4f}  val_acc {_fmt(metrics['val_accuracy'])}  "
                      f"val_bal_acc {_fmt(metrics['val_balanced_accuracy'])}  rows/worker {rows_per_worker}  "
                      f"{metrics['seconds']}s", flush=True)
            ray.train.report(metrics, checkpoint=ckpt)


def _fmt(v):
    return "-" if v is None else f"{v:.3f}"


def write_checkpoint_files(directory, state: dict, meta: dict) -> None:
    """state.pt, then checkpoint.json recording its size and sha256 (see `_verified_checkpoint_meta`).

    Ray Train copies the directory to storage file by file, in no set order, and lists a checkpoint
    in its run snapshot (what `ray.train.get_checkpoint()` hands back on resume) only after the copy
    finished; a copy cut short leaves a `checkpoint_*` folder that Ray ignores but that a glob sees."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    Path(directory, STATE).write_bytes(data)
    meta = dict(meta, state_bytes=len(data), state_sha256=hashlib.sha256(data).hexdigest())
    Path(directory, CHECKPOINT_META).write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- driver side
def _fingerprint(x: np.ndarray, y: np.ndarray, extra: dict) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def _verified_checkpoint_meta(ckpt_dir: Path) -> dict | None:
    """checkpoint.json of a complete checkpoint folder; None for a partial or damaged one (no or
    unreadable checkpoint.json, no state.pt, state.pt of another size or hash than recorded).
    Checkpoints written before sizes were recorded (and the GAN's) pass when state.pt is a whole
    zip archive (what torch.save writes; a truncated one loses its end-of-archive record)."""
    try:
        meta = json.loads((ckpt_dir / CHECKPOINT_META).read_text())
        state = ckpt_dir / STATE
        if not isinstance(meta, dict) or not isinstance(meta.get("epoch"), int) or not state.is_file():
            return None
        if "state_bytes" not in meta:
            return meta if zipfile.is_zipfile(state) else None
        if state.stat().st_size != meta["state_bytes"]:
            return None
        h = hashlib.sha256()
        with open(state, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return meta if h.hexdigest() == meta.get("state_sha256") else None
    except (OSError, ValueError):
        return None


def _registered_checkpoints(run_dir: Path) -> set[str] | None:
    """Names of the checkpoint folders Ray Train lists in its run snapshot: the ones it resumes
    from. A folder can be complete on disk and still missing there (the run died after the copy,
    before the controller registered it); Ray then resumes from the one before. None: no snapshot
    (or an unreadable one)."""
    try:
        snap = json.loads((run_dir / RAY_SNAPSHOT).read_text())
        results = [*snap.get("checkpoint_results", []), snap.get("latest_checkpoint_result") or {}]
        return {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def _latest_local_checkpoint(run_dir: Path) -> dict | None:
    """checkpoint.json of the newest complete checkpoint under `run_dir` that Ray would resume from
    (partial folders and ones Ray never registered are skipped)."""
    if not run_dir.is_dir():
        return None
    registered = _registered_checkpoints(run_dir)
    metas = []
    for meta in run_dir.glob("checkpoint_*/" + CHECKPOINT_META):
        if registered is not None and meta.parent.name not in registered:
            continue
        try:
            epoch = json.loads(meta.read_text())["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(epoch, int):
            metas.append((epoch, meta.parent))
    for _, ckpt_dir in sorted(metas, key=lambda m: m[0], reverse=True):  # hash only until one passes
        verified = _verified_checkpoint_meta(ckpt_dir)
        if verified is not None:
            return verified
    return None


def resolve_run_storage(storage: str | None, name: str, fingerprint: str, epochs: int, log=print) -> str:
    """The storage path of run `name` (absolute when local). A local run of that name trained on
    other data is refused; one that already has `epochs` epochs just writes its bundle again."""
    storage = storage or DEFAULT_STORAGE
    if "://" in storage:
        return storage
    storage = str(Path(storage).expanduser().absolute())
    previous = _latest_local_checkpoint(Path(storage) / name)
    if previous and previous["fingerprint"] != fingerprint:
        raise MedrayError(f"run {name!r} in {storage} was trained on different data or preprocessing; "
                          "pass another --name (or remove that run) to start a new one")
    if previous and previous["epoch"] >= epochs:
        log(f"[medray] run {name!r} already has {previous['epoch']} epochs; writing its bundle")
    return storage


def fit_to_final_state(trainer, name: str) -> tuple[dict, float]:
    """Run a TorchTrainer; the state saved in its final checkpoint and the seconds it took."""
    started = time.time()
    result = trainer.fit()
    if result.error:
        raise MedrayError(f"training failed: {result.error}")
    if result.checkpoint is None:
        raise MedrayError(f"training run {name!r} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=False)
    return state, round(time.time() - started, 1)


def _to_ray_dataset(x: np.ndarray, y: np.ndarray, seed: int, shuffle: bool):
    """Rows as a Ray Dataset. Training rows are permuted first (files are often sorted by class,
    and a local shuffle buffer alone would then feed single-class batches); workers add a local
    shuffle buffer on top, reseeded every epoch."""
    import ray.data

    order = np.random.default_rng(seed).permutation(len(y)) if shuffle else np.arange(len(y))
    return ray.data.from_items([{"x": x[i], "y": int(y[i])} for i in order])


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
    log=print,
) -> dict:
    """Train one model as a Ray Train job and write its bundle to `out`. Returns bundle.json.

    Unreadable images, malformed rows and bad sequences in `data` fail before training, naming
    them; with `skip_bad` they are left out, logged, and counted in the bundle's `data.skipped`."""
    preset = load_preset(task, model)
    recipe = dict(preset["train"])
    recipe.update({k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None})
    if recipe["epochs"] < 1 or recipe["batch_size"] < 1 or recipe["lr"] <= 0 or workers < 1:
        raise MedrayError("epochs, batch size and workers must be at least 1 and the learning rate positive")

    exclude = (group_column,) if group_column and ":" not in group_column else ()
    data = localize(data)
    ds = read_training_data(task, data, preset=preset, label_column=label_column, exclude=exclude,
                            skip_bad=skip_bad)
    if skipped_warning(ds):
        log(f"[medray] {skipped_warning(ds)}")
    if ds.labels is None:
        raise DataError(f"{data}: no labels found")
    labels = sorted(set(ds.labels.tolist()))
    if len(labels) < 2:
        raise DataError(f"{data}: only one class ({labels[0]!r}) in the labels; at least two are needed")
    groups = resolve_groups(group_column, ds)
    y = encode_labels(ds.labels, labels, data)
    tr_idx, va_idx = split_indices(ds.labels, groups, val_fraction, seed)
    train_ds, val_ds = ds.take(tr_idx), ds.take(va_idx)
    if len(set(y[tr_idx])) < 2:
        raise DataError(f"{data}: the training split holds a single class; add data or change the split")
    prep = fit_preprocessor(task, train_ds, preset)
    x_tr, x_va = prep.transform(train_ds.inputs), prep.transform(val_ds.inputs)
    y_tr, y_va = y[tr_idx], y[va_idx]
    counts = np.bincount(y_tr, minlength=len(labels))
    class_weights = None
    if recipe.get("class_weights") == "balanced":
        class_weights = (len(y_tr) / (len(labels) * np.maximum(counts, 1))).round(6).tolist()

    arch = {"name": preset["name"], "params": preset.get("params", {})}
    fingerprint = _fingerprint(x_tr, y_tr, {"labels": labels, "val": hashlib.sha256(x_va.tobytes()).hexdigest()})
    run_key = hashlib.sha256(json.dumps([fingerprint, arch, recipe, seed, workers], sort_keys=True).encode()).hexdigest()
    name = name or f"{task}-{preset['name']}-{run_key[:10]}"
    storage = resolve_run_storage(storage, name, fingerprint, recipe["epochs"], log)

    per_worker = max(1, len(y_tr) // workers)
    steps_per_epoch = -(-per_worker // recipe["batch_size"])
    config = {
        "model": arch, "input_shape": prep.input_shape, "n_classes": len(labels), "labels": labels,
        "epochs": recipe["epochs"], "batch_size": recipe["batch_size"], "lr": recipe["lr"],
        "weight_decay": recipe.get("weight_decay", 0.0), "augment": recipe.get("augment") or {},
        "class_weights": class_weights, "seed": seed, "fingerprint": fingerprint, "steps_per_epoch": steps_per_epoch,
    }
    log(f"[medray] {task}: {len(ds)} rows from {data} → train {len(y_tr)} / validation {len(y_va)} "
        f"({'grouped by ' + group_column if groups is not None else 'stratified'}); model {preset['name']}; "
        f"{workers} worker(s) on {'GPU' if gpu else 'CPU'}; run {name!r} in {storage}")

    from medray.ray_runtime import ensure_ray

    ensure_ray(address)
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources,
                                               placement_strategy=placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        ),
        datasets={"train": _to_ray_dataset(x_tr, y_tr, seed, shuffle=True),
                  "val": _to_ray_dataset(x_va, y_va, seed, shuffle=False)},
    )
    state, seconds = fit_to_final_state(trainer, name)
    meta = {
        "name": Path(out).name,
        "task": task,
        "model": arch,
        "training": {**{k: config[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "augment", "class_weights")},
                     "optimizer": "AdamW", "schedule": "cosine per step", "seed": seed, "workers": workers, "gpu": gpu,
                     "epochs_trained": state["epoch"], "run_name": name, "storage_path": storage,
                     "seconds": seconds},
        "preprocessing": prep.to_dict(),
        "labels": labels,
        "label_column": ds.meta.get("label_column"),
        "input_shape": prep.input_shape,
        "input": _input_spec(task, prep),
        "data": {"source": str(data), "rows": len(ds), "train_rows": int(len(y_tr)), "val_rows": int(len(y_va)),
                 "class_counts_train": dict(zip(labels, counts.tolist())),
                 "split": {"val_fraction": val_fraction, "group_column": group_column, "seed": seed},
                 "fingerprint": fingerprint,
                 **({"skipped": skipped_summary(ds)} if skipped_summary(ds) else {})},
        "metrics": {"validation": state["val_metrics"], "history": state["history"]},
    }
    path = write_bundle(out, state["model"], meta)
    log(f"[medray] bundle written to {path}")
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
