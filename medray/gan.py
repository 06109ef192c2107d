"""A GAN that generates DNA sequences: WGAN-GP on softmax outputs, trained data-parallel on Ray Train.

Why this formulation: DNA is discrete, so a generator that emits hard bases has no gradient. The
generator emits a per-position distribution over A/C/G/T (a softmax); the critic compares those
soft one-hots with the real one-hot sequences. A Wasserstein critic with gradient penalty
(Gulrajani et al. 2017, used for DNA by Killoran et al. 2017) gives useful gradients even while
the critic can tell soft from hard one-hots, and trains without the mode collapse and balancing of
the original GAN loss. Sampling a base per position from the generator's distribution turns the
output into sequences. With `conditional`, a class embedding (e.g. EI / IE / N) is fed to the
generator and the class one-hot to the critic as extra constant channels.

Data parallelism: each worker reads its shard (`get_dataset_shard`); gradients of both networks
are averaged across workers with an explicit all-reduce after each backward pass (DDP's hooks do
not support the double backward of the gradient penalty). Checkpoints hold both networks and both
optimisers every epoch; a re-run with the same name resumes. The bundle holds the generator.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medray.bundle import Bundle, write_bundle
from medray.console import StepTicker, epoch_done, say
from medray.data import pipeline
from medray.data.dataset import skipped_summary, skipped_warning
from medray.data.genomic import BASES, read_genomic, sequence_hash
from medray.data.location import localize
from medray.errors import DataError, MedrayError
from medray.models import DNACritic, DNAGenerator
from medray.preprocessing import SequenceEncoder
from medray.train_common import STATE, ShardFeed, gather, resolve_run_storage, run_trainer, write_checkpoint_files

TASK = "genomic-gan"


def _allreduce_grads(module: nn.Module) -> None:
    """Average gradients over workers: one all-reduce of all of them, flattened."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(module.parameters(), grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _broadcast(module: nn.Module) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def gan_loop_per_worker(config: dict):
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(config["seed"])  # same initial weights on every worker (then broadcast anyway)
    device = torch.device("cuda" if config["gpu"] and torch.cuda.is_available() else "cpu")
    k = len(config["labels"]) if config["conditional"] else 0
    gen = DNAGenerator([4, config["length"]], len(config["labels"]), **config["generator"]).to(device)
    critic = DNACritic(config["length"], k, width=config["generator"]["width"]).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=config["lr"], betas=(0.5, 0.9))
    opt_c = torch.optim.Adam(critic.parameters(), lr=config["lr"], betas=(0.5, 0.9))
    start, history = 1, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location=device, weights_only=False)
        gen.load_state_dict(state["generator"])
        critic.load_state_dict(state["critic"])
        opt_g.load_state_dict(state["opt_generator"])
        opt_c.load_state_dict(state["opt_critic"])
        start, history = state["epoch"] + 1, state["history"]
    _broadcast(gen)
    _broadcast(critic)
    # this worker's shard, read once (sequences are small); batches are drawn from it at random
    feed = ShardFeed(ray.train.get_dataset_shard("train"), batch_size=config["batch_size"], device=device,
                     cache=True, shuffle=False, seed=config["seed"])
    xs, ys = feed.rows()
    xs, ys = xs.float(), ys.long()
    rng = torch.Generator(device="cpu").manual_seed(config["seed"] * 1000 + rank)
    for epoch in range(start, config["epochs"] + 1):
        t0 = time.time()
        gen.train()
        c_losses, g_losses, gps, step = [], [], [], 0
        tick = StepTicker(config if rank == 0 else {}, epoch)
        for step in range(1, config["steps_per_epoch"] + 1):
            tick(step)
            idx = torch.randint(0, len(xs), (config["batch_size"],), generator=rng).to(device)
            real, y = xs[idx], ys[idx]
            n = len(real)
            z = torch.randn(n, gen.z_dim, generator=rng).to(device)
            fake = gen(z, y).detach()
            eps = torch.rand(n, 1, 1, generator=rng).to(device)
            mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
            grad = torch.autograd.grad(critic(mix, y).sum(), mix, create_graph=True)[0]
            gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
            loss_c = critic(fake, y).mean() - critic(real, y).mean() + config["gp_weight"] * gp
            opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            _allreduce_grads(critic)
            opt_c.step()
            c_losses.append(float(loss_c.detach()))
            gps.append(float(gp.detach()))
            if step % config["n_critic"] == 0:
                z = torch.randn(n, gen.z_dim, generator=rng).to(device)
                loss_g = -critic(gen(z, y), y).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                _allreduce_grads(gen)
                opt_g.step()
                g_losses.append(float(loss_g.detach()))
        parts = gather((step, float(np.mean(c_losses)) if c_losses else 0.0,
                         float(np.mean(g_losses)) if g_losses else 0.0, float(np.mean(gps)) if gps else 0.0,
                         ray.get_runtime_context().get_node_id(), len(xs)))
        metrics = {"epoch": epoch, "critic_loss": round(float(np.mean([p[1] for p in parts])), 5),
                   "generator_loss": round(float(np.mean([p[2] for p in parts])), 5),
                   "gradient_penalty": round(float(np.mean([p[3] for p in parts])), 5),
                   "steps_per_worker": [p[0] for p in parts], "rows_per_worker": [p[5] for p in parts],
                   "node_per_worker": [p[4] for p in parts],
                   "seconds": round(time.time() - t0, 2)}
        if rank == 0:  # quality on the way: 4-mer distance of 512 samples to the training data
            gen.eval()
            sample = sample_sequences(gen, 512, None, config["seed"] + epoch, config["labels"])[0]
            metrics["kmer4_js"] = round(kmer_js(sample, config["reference"], 4), 5)
        history.append(metrics)
        if rank == 0:
            epoch_done(config, epoch, metrics)  # the driver's progress display
        with tempfile.TemporaryDirectory() as tmp:
            out = None
            if rank == 0:
                write_checkpoint_files(tmp, {"epoch": epoch, "generator": gen.state_dict(), "critic": critic.state_dict(),
                                             "opt_generator": opt_g.state_dict(), "opt_critic": opt_c.state_dict(),
                                             "history": history},
                                       {"epoch": epoch, "fingerprint": config["fingerprint"]})
                out = ray.train.Checkpoint.from_directory(tmp)
                print(f"[medray] gan epoch {epoch}/{config['epochs']}  critic {metrics['critic_loss']:.3f}  "
                      f"generator {metrics['generator_loss']:.3f}  gp {metrics['gradient_penalty']:.3f}  "
                      f"4-mer JS {metrics.get('kmer4_js')}  {metrics['seconds']}s", flush=True)
            ray.train.report(metrics, checkpoint=out)


# ----------------------------------------------------------------------------- sampling


@torch.inference_mode()
def sample_sequences(gen: DNAGenerator, n: int, label: int | None, seed: int, labels: list[str]):
    """n sequences (and their class names) sampled from the generator; the same seed gives the same
    sequences. Unconditional models ignore `label`; conditional ones cycle through the classes
    when no label is given."""
    device = next(gen.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(n, gen.z_dim, generator=g)
    if gen.conditional:
        y = torch.full((n,), int(label)) if label is not None else torch.arange(n) % gen.n_classes
    else:
        y = torch.zeros(n, dtype=torch.long)
    probs = gen(z.to(device), y.to(device)).float().cpu()  # (n, 4, L)
    flat = probs.permute(0, 2, 1).reshape(-1, 4)
    idx = torch.multinomial(flat, 1, generator=g).view(n, -1).numpy()
    letters = np.frombuffer(BASES.encode(), dtype=np.uint8)[idx]
    seqs = [row.tobytes().decode() for row in letters]
    names = [labels[int(v)] for v in y] if gen.conditional else [None] * n
    return seqs, names


def generate(bundle: Bundle, n: int, label: str | None = None, seed: int = 0) -> tuple[list[str], list]:
    if bundle.task != TASK:
        raise MedrayError(f"{bundle.path}: a {bundle.task} bundle, not a sequence generator")
    labels = bundle.labels
    conditional = bundle.meta["model"]["params"].get("conditional", False)
    if label is not None and not conditional:
        raise MedrayError(f"{bundle.path}: this generator is unconditional; it takes no label")
    if label is not None and label not in labels:
        raise MedrayError(f"unknown label {label!r} (this generator knows: {', '.join(labels)})")
    if n < 1:
        raise MedrayError("n must be at least 1")
    return sample_sequences(bundle.model, n, labels.index(label) if label is not None else None, seed, labels)


# ----------------------------------------------------------------------------- metrics


def kmer_spectrum(seqs: list[str], k: int) -> np.ndarray:
    """Normalised counts of the 4^k k-mers over A/C/G/T (k-mers with other letters are skipped)."""
    lut = np.full(256, -1, dtype=np.int64)
    for i, b in enumerate(BASES):
        lut[ord(b)] = i
    counts = np.zeros(4 ** k, dtype=np.float64)
    for s in seqs:
        codes = lut[np.frombuffer(s.encode(), dtype=np.uint8)]
        if len(codes) < k:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(codes, k)
        ok = (windows >= 0).all(axis=1)
        idx = (windows[ok] * (4 ** np.arange(k - 1, -1, -1))).sum(axis=1)
        counts += np.bincount(idx, minlength=4 ** k)
    return counts / max(counts.sum(), 1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint)."""
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / b[mask])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def kmer_js(a: list[str], b: list[str], k: int) -> float:
    return js_divergence(kmer_spectrum(a, k), kmer_spectrum(b, k))


def gc_content(seqs: list[str]) -> np.ndarray:
    return np.array([(s.count("G") + s.count("C")) / max(1, sum(s.count(c) for c in BASES)) for s in seqs])


def position_frequencies(seqs: list[str], length: int) -> np.ndarray:
    """(length, 4) base frequency per position of equal-length sequences (others centred as in one-hot)."""
    x = SequenceEncoder(length).transform(seqs)  # (n, 4, L); IUPAC codes count fractionally
    return x.mean(axis=0).T


def random_like(reference: list[str], n: int, length: int, seed: int) -> list[str]:
    """i.i.d. sequences with the reference's base composition: the baseline a GAN must beat."""
    comp = kmer_spectrum(reference, 1)
    idx = np.random.default_rng(seed).choice(4, size=(n, length), p=comp)
    return [row.tobytes().decode() for row in np.frombuffer(BASES.encode(), dtype=np.uint8)[idx]]


_hash = sequence_hash


def compare(generated: list[str], reference: list[str], length: int, train_hashes: set | None = None) -> dict:
    from scipy.stats import wasserstein_distance

    out = {f"kmer_js_k{k}": round(kmer_js(generated, reference, k), 5) for k in range(1, 7)}
    out["gc_wasserstein"] = round(float(wasserstein_distance(gc_content(generated), gc_content(reference))), 5)
    out["position_freq_mae"] = round(float(np.abs(position_frequencies(generated, length)
                                                   - position_frequencies(reference, length)).mean()), 5)
    if train_hashes is not None:
        out["copies_of_training"] = round(float(np.mean([_hash(s) in train_hashes for s in generated])), 5)
    return out


def junction_motif_rate(seqs: list[str], motif: str = "GT") -> float:
    """Fraction of sequences with `motif` right after the centre (a splice donor's GT in EI data)."""
    if not seqs:
        return 0.0
    return float(np.mean([s[len(s) // 2 : len(s) // 2 + len(motif)] == motif for s in seqs]))


def evaluate_gan(bundle: Bundle, data: str, n: int | None = None, seed: int = 0, classifier: str | None = None) -> dict:
    """Generated vs. real (the sequences in `data`, held out from training when possible), beside two
    references computed the same way: i.i.d. random sequences with the real base composition, and a
    second real sample. Real data is split in two halves: A is the reference, B the second sample."""
    ds = read_genomic(localize(data), require_labels=False)
    length = bundle.meta["input_shape"][1]
    real = [s for s in ds.inputs if len(s) == length]
    if len(real) < 20:
        raise DataError(f"{data}: fewer than 20 sequences of the generator's length {length}")
    order = np.random.default_rng(seed).permutation(len(real))
    a = [real[i] for i in order[: len(real) // 2]]
    b = [real[i] for i in order[len(real) // 2 :]]
    n = n or len(b)
    train_hashes = set(bundle.meta.get("training_hashes", []))
    generated, names = generate(bundle, n, seed=seed)
    report = {
        "n_generated": n, "n_reference": len(a), "n_second_real": len(b),
        "generated": compare(generated, a, length, train_hashes),
        "random_baseline": compare(random_like(a, n, length, seed + 1), a, length, train_hashes),
        "second_real_sample": compare(b, a, length, train_hashes),
    }
    conditional = bundle.meta["model"]["params"].get("conditional", False)
    if conditional and ds.labels is not None:
        per_class = {}
        if classifier:
            from medray.bundle import load_bundle

            clf = load_bundle(classifier)
        for lab in bundle.labels:
            g, _ = generate(bundle, max(64, n // len(bundle.labels)), label=lab, seed=seed)
            r = [s for s, y in zip(ds.inputs, ds.labels) if y == lab and len(s) == length]
            per_class[lab] = {"generated_GT_after_centre": round(junction_motif_rate(g), 4),
                              "real_GT_after_centre": round(junction_motif_rate(r), 4),
                              "generated_AG_before_centre": round(float(np.mean([s[length // 2 - 2: length // 2] == "AG"
                                                                                 for s in g])), 4),
                              "real_AG_before_centre": round(float(np.mean([s[length // 2 - 2: length // 2] == "AG"
                                                                            for s in r])) if r else 0.0, 4)}
            if classifier:
                pred = np.array(clf.labels)[clf.predict(g).argmax(axis=1)]
                per_class[lab]["classifier_accuracy"] = round(float(np.mean(pred == lab)), 4)
        report["per_class"] = per_class
    return report


# ----------------------------------------------------------------------------- driver
def _report(folder: Path, reference: list[str], seed: int) -> None:
    """The bundle's report/: generated sequences (as many as the real sample) against it."""
    from medray.bundle import load_bundle
    from medray.report import write_gan_report

    bundle = load_bundle(folder)  # the weights and bundle.json are written; the report is the last part
    length = bundle.meta["input_shape"][1]
    generated, _ = generate(bundle, len(reference), seed=seed)
    random = random_like(reference, len(reference), length, seed + 1)
    hashes = set(bundle.meta.get("training_hashes", []))
    comparison = {"generated": compare(generated, reference, length, hashes),
                  "random_baseline": compare(random, reference, length, hashes)}
    write_gan_report(folder / "report", bundle.meta, generated, reference, random, comparison)



def train_gan(data: str, out: str, *, epochs: int = 24, batch_size: int = 32, lr: float = 1e-4, workers: int = 2,
              gpu: bool = False, storage: str | None = None, name: str | None = None, seed: int = 0,
              conditional: bool = False, n_critic: int = 5, gp_weight: float = 10.0, z_dim: int = 64,
              steps_per_epoch: int = 500,
              max_failures: int = 2, address: str | None = None, placement_strategy: str = "PACK",
              skip_bad: bool = False, log=say, label: str | None = None, **_ignored) -> dict:
    from medray.ray_runtime import ensure_ray

    if epochs < 1 or batch_size < 2 or workers < 1 or lr <= 0:
        raise MedrayError("epochs and workers must be at least 1, batch size at least 2, the learning rate positive")
    source = pipeline.open_source("genomic", data, require_labels=conditional)
    ensure_ray(address)
    keys = pipeline.read_keys(source, skip_bad=skip_bad, require_labels=conditional)  # on the cluster
    if skipped_warning(keys):
        log(f"[medray] {skipped_warning(keys)}")
    lengths = keys.rows["_len"].to_numpy()
    length = int(np.bincount(lengths).argmax())
    keep = np.flatnonzero(lengths == length)
    if len(keep) < batch_size * workers:
        raise DataError(f"{data}: {len(keep)} sequences of length {length}; too few for batches of {batch_size} "
                        f"on {workers} worker(s)")
    labels = sorted(set(keys.labels[keep].tolist())) if conditional else []
    enc = SequenceEncoder(length)
    arch = {"name": "dna_generator", "params": {"z_dim": z_dim, "width": 256, "conditional": conditional}}
    recipe = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "n_critic": n_critic, "gp_weight": gp_weight,
              "steps_per_epoch": steps_per_epoch}
    fingerprint = pipeline.fingerprint(keys, {"labels": labels, "task": TASK, "length": length})
    run_key = hashlib.sha256(json.dumps([fingerprint, arch, recipe, seed, workers], sort_keys=True).encode()).hexdigest()
    name = name or f"{TASK}-{run_key[:10]}"
    storage = resolve_run_storage(storage, name, fingerprint, epochs, log)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(keep, min(2000, len(keep)), replace=False))
    reference = [str(s) for s in pipeline.collect_inputs(source, keys.keys[sample])]
    config = {"length": length, "labels": labels, "conditional": conditional, "generator": arch["params"],
              "seed": seed, "gpu": gpu, "fingerprint": fingerprint, "reference": reference, **recipe}
    log(f"[medray] {TASK}: {len(keep)} sequences of length {length} from {data}"
        f"{' (conditional on ' + ', '.join(labels) + ')' if conditional else ''}; {workers} worker(s) on "
        f"{'GPU' if gpu else 'CPU'}; run {name!r} in {storage}")
    label_index = {c: i for i, c in enumerate(labels)} if conditional else None
    datasets = {"train": pipeline.dataset(source, keys.keys[keep], enc, label_index, shuffle_seed=seed)}
    state, seconds = run_trainer(gan_loop_per_worker, config, datasets, name=name, storage=storage, workers=workers,
                                 gpu=gpu, max_failures=max_failures, placement_strategy=placement_strategy,
                                 num_to_keep=3, label=label or TASK)
    meta = {
        "name": Path(out).name, "task": TASK, "model": arch,
        "training": {**recipe, "optimizer": "Adam(0.5, 0.9)", "loss": "WGAN-GP", "seed": seed, "workers": workers,
                     "gpu": gpu, "epochs_trained": state["epoch"], "run_name": name, "storage_path": storage,
                     "seconds": seconds},
        "preprocessing": enc.to_dict(), "labels": labels, "input_shape": [4, length],
        "input": {"type": "noise", "z_dim": z_dim, "conditional": conditional, "length": length},
        "data": {"source": str(data), "sequences": int(len(keep)), "fingerprint": fingerprint,
                 **({"skipped": skipped_summary(keys)} if skipped_summary(keys) else {})},
        # hashes only (no sequences): enough to measure memorisation without shipping the training data
        "training_hashes": sorted(set(keys.rows["_seqhash"].iloc[keep].tolist())),
        "metrics": {"history": state["history"]},
    }
    path = write_bundle(out, state["generator"], meta, extra=lambda folder, full: _report(folder, reference, seed))
    log(f"[medray] generator bundle written to {path}")
    return meta
