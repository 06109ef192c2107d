"""What the training jobs (`medray.train`, `medray.gan`) share: feeding a worker its shard of a
Ray Dataset, gathering across workers, checkpoint files and their verification, run storage, and
running a `TorchTrainer` to its final checkpoint.

Feeding (`ShardFeed`): a worker's shard that fits in memory (`MEDRAY_WORKER_CACHE_MB`, default
1024 MB per worker for training plus validation rows) is read from Ray Data once, on the first
epoch, and kept as tensors on the worker's device; every later epoch draws a seeded permutation of
it, so a short epoch pays no streaming-split start, no block transfer and no collation. A larger
shard streams every epoch (`iter_torch_batches` with prefetching and a seeded local shuffle
buffer). Either way the feed counts the seconds the loop waited for data.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from medray.errors import MedrayError

STATE = "state.pt"
CHECKPOINT_META = "checkpoint.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of registered checkpoints
DEFAULT_STORAGE = os.environ.get("MEDRAY_STORAGE", os.path.expanduser("~/medray-runs"))
CACHE_MB = float(os.environ.get("MEDRAY_WORKER_CACHE_MB", "1024"))
SHUFFLE_BUFFER_MB = 256  # local shuffle buffer of a streamed shard


# ----------------------------------------------------------------------------- worker side
def unwrap(model):
    return model.module if hasattr(model, "module") else model


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_workers_(flat: torch.Tensor) -> torch.Tensor:
    """Replace `flat` by its mean over the workers, in place; every rank gets the same bits.

    Two CPU workers (gloo) swap their halves directly: one send and one receive each, at once.
    Gloo's all-reduce runs a ring even for two ranks, several round trips: on 2 CPU cores it took
    1.1-1.5 ms for a 32k-parameter model's gradients against 0.3-0.8 ms for the swap, more than
    the default genomic model's forward and backward at batch 8 (tests/test_distributed.py checks
    the two agree; `benchmarks/ddp_floor.py` measures both). a/2 + b/2 and b/2 + a/2 round alike,
    so the ranks stay identical. Any other case is one all-reduce."""
    import torch.distributed as dist

    world = dist.get_world_size()
    flat.div_(world)
    if world == 2 and not flat.is_cuda and dist.get_backend() == "gloo":
        other, peer = torch.empty_like(flat), 1 - dist.get_rank()
        for work in (dist.isend(flat, peer), dist.irecv(other, peer)):
            work.wait()
        flat.add_(other)
    else:
        dist.all_reduce(flat)
    return flat


def mean_over_workers_hook(_state, bucket):
    """DDP communication hook: each gradient bucket's mean by `mean_over_workers_`."""
    fut = torch.futures.Future()
    fut.set_result(mean_over_workers_(bucket.buffer()))
    return fut


def prepare_model(model):
    """Ray Train's `prepare_model` (DDP across workers, on the worker's device), without buffer
    broadcast (see average_buffers); a model of one gradient bucket (≤ ONE_BUCKET_BYTES) exchanges
    its gradients by `mean_over_workers_`."""
    import ray.train.torch

    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=DDP_OPTIONS)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and \
            sum(p.numel() * p.element_size() for p in model.parameters()) <= ONE_BUCKET_BYTES:
        model.register_comm_hook(None, mean_over_workers_hook)
    return model


# The hook blocks until the peer's half arrives. With one gradient bucket (DDP's first holds 1 MiB)
# that is the end of the backward pass anyway; a bigger model's first bucket would wait mid-backward
# instead of overlapping, so it keeps DDP's asynchronous all-reduce (ultrasound 10×, one A/B pair on
# 2026-12-07: 155 samples/s with the hook, 177 without)
ONE_BUCKET_BYTES = 1 << 20


def average_buffers(model) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the workers. The DDP
    wrapper is built with `forward_sync_buffers=False` (no broadcast of rank 0's buffers before
    every forward: a second collective per step, 15 % of a small model's step on 2 CPU cores);
    instead each worker keeps statistics of its own shard and they are averaged once an epoch,
    before validation and the checkpoint: every rank then validates the same model, and the saved
    statistics cover every shard rather than rank 0's alone."""
    if not distributed():
        return
    bufs = [b for b in unwrap(model).buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = mean_over_workers_(torch.cat([b.detach().reshape(-1) for b in bufs]))
    offset = 0
    for b in bufs:
        b.copy_(flat[offset: offset + b.numel()].view_as(b))
        offset += b.numel()


# what `prepare_model` passes to DDP (see average_buffers)
DDP_OPTIONS = {"forward_sync_buffers": False}


def gather(obj) -> list:
    """`obj` of every worker, in rank order (just [obj] without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def fits_in_worker_memory(rows_per_worker: int, input_shape, itemsize: int = 4) -> bool:
    """Whether a worker's shard (x as float32 + y) fits the per-worker cache budget."""
    per_row = itemsize * int(np.prod(input_shape)) + 8
    return rows_per_worker * per_row <= CACHE_MB * (1 << 20)


class ShardFeed:
    """Batches (x, y) of this worker's shard, epoch after epoch; see the module docstring.
    `wait_s` holds the seconds the last epoch spent waiting for data."""

    def __init__(self, shard, *, batch_size: int, device, cache: bool, shuffle: bool, seed: int,
                 input_shape=None):
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self.cache, self.shuffle, self.seed = cache, shuffle, seed
        self.buffer_rows = max(4 * batch_size, int(SHUFFLE_BUFFER_MB * (1 << 20)
                                                   // (4 * int(np.prod(input_shape or [1])) + 8)))
        self._x = self._y = None
        self.wait_s = 0.0

    def _read_all(self):
        xs, ys = [], []
        for batch in self.shard.iter_torch_batches(batch_size=4096, device=self.device, prefetch_batches=2):
            xs.append(batch["x"])
            ys.append(batch["y"])
        if xs:
            self._x, self._y = torch.cat(xs), torch.cat(ys)
        else:
            self._x, self._y = torch.zeros(0), torch.zeros(0, dtype=torch.long)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole shard as tensors (read once; cache mode)."""
        if self._x is None:
            self._read_all()
        return self._x, self._y

    def _batches(self, epoch: int):
        if self.cache:
            x, y = self.rows()
            n = len(y)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + 7919 * epoch)
                order = torch.randperm(n, generator=g).to(x.device)
            else:
                order = None
            for lo in range(0, n, self.batch_size):
                if order is None:
                    yield x[lo: lo + self.batch_size], y[lo: lo + self.batch_size]
                else:
                    idx = order[lo: lo + self.batch_size]
                    yield x[idx], y[idx]
            return
        kw = dict(local_shuffle_buffer_size=self.buffer_rows, local_shuffle_seed=self.seed + 7919 * epoch) \
            if self.shuffle else {}
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, device=self.device,
                                                   prefetch_batches=4, **kw):
            yield batch["x"], batch["y"]

    def epoch(self, epoch: int):
        """This epoch's batches; the time spent waiting for each is added to `wait_s`."""
        self.wait_s = 0.0
        it = self._batches(epoch)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.wait_s += time.perf_counter() - t0
                return
            self.wait_s += time.perf_counter() - t0
            yield batch


# ----------------------------------------------------------------------------- checkpoints and run storage
def write_checkpoint_files(directory, state: dict, meta: dict) -> None:
    """state.pt, then checkpoint.json recording its size and sha256 (see `verified_checkpoint_meta`).

    Ray Train copies the directory to storage file by file, in no set order, and lists a checkpoint
    in its run snapshot (what `ray.train.get_checkpoint()` hands back on resume) only after the copy
    finished; a copy cut short leaves a `checkpoint_*` folder that Ray ignores but that a glob sees."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    Path(directory, STATE).write_bytes(data)
    meta = dict(meta, state_bytes=len(data), state_sha256=hashlib.sha256(data).hexdigest())
    Path(directory, CHECKPOINT_META).write_text(json.dumps(meta))


def verified_checkpoint_meta(ckpt_dir: Path) -> dict | None:
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


def registered_checkpoints(run_dir: Path) -> set[str] | None:
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


def latest_local_checkpoint(run_dir: Path) -> dict | None:
    """checkpoint.json of the newest complete checkpoint under `run_dir` that Ray would resume from
    (partial folders and ones Ray never registered are skipped)."""
    if not run_dir.is_dir():
        return None
    registered = registered_checkpoints(run_dir)
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
        verified = verified_checkpoint_meta(ckpt_dir)
        if verified is not None:
            return verified
    return None


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of medray's own code (the package's .py and preset .yaml files, by relative path): the
    same for every run of one installed version, different after an upgrade or an edited checkout."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def run_key(*parts) -> str:
    """The key a default run name is made from: `parts` (data fingerprint, model, recipe, seed,
    workers, …) and `code_digest()`. A run is resumed (or its finished checkpoint reused, as
    `medray cv` does fold by fold) only by the medray code that started it: after an upgrade that
    changes training, the same command trains anew instead of returning the old code's result."""
    return hashlib.sha256(json.dumps([code_digest(), *parts], sort_keys=True).encode()).hexdigest()


def resolve_run_storage(storage: str | None, name: str, fingerprint: str, epochs: int, log=print) -> str:
    """The storage path of run `name` (absolute when local). A local run of that name trained on
    other data is refused; one that already has `epochs` epochs just writes its bundle again."""
    storage = storage or DEFAULT_STORAGE
    if "://" in storage:
        return storage
    storage = str(Path(storage).expanduser().absolute())
    previous = latest_local_checkpoint(Path(storage) / name)
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


def checkpoint_interval_s() -> float:
    """Least seconds between two checkpoints (`MEDRAY_CHECKPOINT_INTERVAL_S`, default 1; 0 = every
    epoch). Epochs longer than that are each checkpointed; shorter ones in groups; the last always."""
    value = os.environ.get("MEDRAY_CHECKPOINT_INTERVAL_S", "1")
    try:
        return max(0.0, float(value))
    except ValueError:
        raise MedrayError(f"MEDRAY_CHECKPOINT_INTERVAL_S must be a number of seconds, got {value!r}") from None


def run_trainer(loop, config: dict, datasets: dict, *, name: str, storage: str, workers: int, gpu: bool,
                max_failures: int, placement_strategy: str = "PACK", num_to_keep: int | None = None,
                label: str | None = None, deterministic: bool = True):
    """Fit a TorchTrainer running `loop` on `workers` workers (one CPU, and a GPU with `gpu`, each)
    over `datasets` (each split across the workers); the final checkpoint's state and the seconds.
    The loop finds a progress queue in `config["progress"]` (medray/console.py), shown as `label`.
    `deterministic`: the shards' rows in a fixed order (see `whole_validation_config`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from medray.console import progress_run

    resources = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
    with progress_run(label or name, config["epochs"]) as progress:  # rank 0 → the driver's display
        trainer = TorchTrainer(
            loop,
            train_loop_config={**config, "progress": progress},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources,
                                                   placement_strategy=placement_strategy),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            ),
            datasets=datasets,
            dataset_config=whole_validation_config(preserve_order=deterministic),
        )
        return fit_to_final_state(trainer, name)


def whole_validation_config(preserve_order: bool = False):
    """Ray Train's DataConfig, except that the "val" dataset is split with `equal=False`: Ray's
    default equal split drops the remainder rows (1 of 447 splice sequences with 2 workers), and
    validation metrics must cover every validation row. Training keeps equal shards (every worker
    takes the same number of steps, as DDP needs).

    `preserve_order`: Ray Data's blocks reach the split in dataset order, not in the order their
    tasks finish. The split hands each block to the worker with the fewest rows so far, so each
    worker then gets the same rows in the same order every run, and the same seed trains the same
    weights (without it, a dataset of several blocks, such as an image folder, trained different
    models from one run to the next: ultrasound grouped-CV accuracy moved by 1.6 points). For shards
    cached in the workers this costs nothing after their one read; streamed shards keep Ray's
    default, whose blocks flow as soon as they are ready."""
    import ray.train

    class WholeValidation(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != "val"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                ds = datasets["val"]
                ds = ds.copy(ds)
                if ds.name is None:
                    ds.set_name("val")
                ds.context.execution_options = self._resolve_execution_options("val")
                hints = worker_node_ids if self._enable_shard_locality else None
                for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[rank]["val"] = split
            return output

    options = None
    if preserve_order:  # Ray Train's defaults (a fresh copy), ordered
        options = ray.train.DataConfig.default_ingest_options()
        options.preserve_order = True
    return WholeValidation(execution_options=options)
