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

import copy
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
from medray.train_common import (STATE, ShardFeed, distributed, gather, mean_over_workers_, resolve_run_storage,
                                 run_key, run_trainer, write_checkpoint_files)

TASK = "genomic-gan"


def _allreduce_grads(module: nn.Module) -> None:
    """Average gradients over workers: one exchange of all of them, flattened."""
    if not distributed():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
    flat = mean_over_workers_(torch.cat([g.reshape(-1) for g in grads]))
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


def build_networks(config: dict, device) -> tuple[DNAGenerator, DNACritic]:
    """The generator and critic a config describes (the same on every worker, and in benchmarks)."""
    k = len(config["labels"]) if config["conditional"] else 0
    gen = DNAGenerator([4, config["length"]], len(config["labels"]), **config["generator"]).to(device)
    critic = DNACritic(config["length"], k, **config.get("critic", {"width": config["generator"]["width"]})).to(device)
    return gen, critic


class GanSteps:
    """Both networks, their optimisers (and the generator's EMA copy), and one WGAN-GP step.
    `run(xs, ys, first, steps, rng)` does critic steps `first .. first+steps-1` (global numbering,
    for the learning-rate schedule), a generator step after every `n_critic`-th; gradients are
    all-reduced across workers when a process group exists (no-op in a single process)."""

    def __init__(self, config: dict, device):
        self.config, self.device = config, device
        self.gen, self.critic = build_networks(config, device)
        betas = tuple(config.get("betas", (0.5, 0.9)))
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=config["lr"], betas=betas)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=config["lr"], betas=betas)
        self.ema = copy.deepcopy(self.gen).requires_grad_(False) if config.get("ema", 0) else None
        self.total = config["epochs"] * config["steps_per_epoch"]

    def sampler(self) -> DNAGenerator:
        """The generator to sample from (and to ship): the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.gen

    def state_dict(self) -> dict:
        out = {"generator": self.gen.state_dict(), "critic": self.critic.state_dict(),
               "opt_generator": self.opt_g.state_dict(), "opt_critic": self.opt_c.state_dict()}
        if self.ema is not None:
            out["generator_ema"] = self.ema.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.gen.load_state_dict(state["generator"])
        self.critic.load_state_dict(state["critic"])
        self.opt_g.load_state_dict(state["opt_generator"])
        self.opt_c.load_state_dict(state["opt_critic"])
        if self.ema is not None:
            self.ema.load_state_dict(state.get("generator_ema", state["generator"]))

    def broadcast(self) -> None:
        for m in (self.gen, self.critic, self.ema):
            if m is not None:
                _broadcast(m)

    def _lr(self, step: int) -> float:
        """Constant, or (lr_decay) linearly down to 10 % of `lr` over the whole run."""
        frac = min(1.0, (step - 1) / max(1, self.total))
        return self.config["lr"] * (1 - 0.9 * frac if self.config.get("lr_decay") else 1.0)

    def _fake(self, z, y, rng, grad: bool):
        """Generated sequences as the critic sees them: softmax outputs, or (hard) one-hot samples
        with a straight-through Gumbel-softmax gradient."""
        if self.config.get("critic_input", "soft") == "soft":
            return self.gen(z, y)
        logits = self.gen.logits(z, y)
        u = torch.rand(logits.shape, generator=rng).to(self.device).clamp_(1e-9, 1 - 1e-9)
        soft = torch.softmax((logits - torch.log(-torch.log(u))) / self.config.get("tau", 1.0), dim=1)
        hard = torch.nn.functional.one_hot(soft.argmax(dim=1), 4).permute(0, 2, 1).to(soft.dtype)
        return hard + soft - soft.detach() if grad else hard

    def run(self, xs, ys, first: int, steps: int, rng, tick=None) -> tuple[list, list, list]:
        cfg, gen, critic = self.config, self.gen, self.critic
        c_losses, g_losses, gps = [], [], []
        gen.train()
        for step in range(first, first + steps):
            if tick is not None:
                tick(step - first + 1)
            lr = self._lr(step)
            for opt in (self.opt_g, self.opt_c):
                for group in opt.param_groups:
                    group["lr"] = lr
            idx = torch.randint(0, len(xs), (cfg["batch_size"],), generator=rng).to(self.device)
            real, y = xs[idx], ys[idx]
            if cfg.get("real_smoothing", 0):  # the critic sees real one-hots smoothed towards uniform
                real = real * (1 - cfg["real_smoothing"]) + cfg["real_smoothing"] / 4
            n = len(real)
            z = torch.randn(n, gen.z_dim, generator=rng).to(self.device)
            with torch.no_grad():
                fake = self._fake(z, y, rng, grad=False)
            eps = torch.rand(n, 1, 1, generator=rng).to(self.device)
            mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
            grad = torch.autograd.grad(critic(mix, y).sum(), mix, create_graph=True)[0]
            gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
            loss_c = critic(fake, y).mean() - critic(real, y).mean() + cfg["gp_weight"] * gp
            self.opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            _allreduce_grads(critic)
            self.opt_c.step()
            c_losses.append(float(loss_c.detach()))
            gps.append(float(gp.detach()))
            if step % cfg["n_critic"] == 0:
                z = torch.randn(n, gen.z_dim, generator=rng).to(self.device)
                loss_g = -critic(self._fake(z, y, rng, grad=True), y).mean()
                self.opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                _allreduce_grads(gen)
                self.opt_g.step()
                g_losses.append(float(loss_g.detach()))
                if self.ema is not None:  # decay warmed up: the first steps do not anchor it to the init
                    t = step // cfg["n_critic"]
                    decay = min(cfg["ema"], (1 + t) / (10 + t))
                    with torch.no_grad():
                        for pe, p in zip(self.ema.parameters(), gen.parameters()):
                            pe.lerp_(p, 1 - decay)
        return c_losses, g_losses, gps


def gan_loop_per_worker(config: dict):
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(config["seed"])  # same initial weights on every worker (then broadcast anyway)
    device = torch.device("cuda" if config["gpu"] and torch.cuda.is_available() else "cpu")
    steps = GanSteps(config, device)
    start, history = 1, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location=device, weights_only=False)
        steps.load_state_dict(state)
        start, history = state["epoch"] + 1, state["history"]
    steps.broadcast()
    # this worker's shard, read once (sequences are small); batches are drawn from it at random
    feed = ShardFeed(ray.train.get_dataset_shard("train"), batch_size=config["batch_size"], device=device,
                     cache=True, shuffle=False, seed=config["seed"])
    xs, ys = feed.rows()
    xs, ys = xs.float(), ys.long()
    rng = torch.Generator(device="cpu")
    per_epoch = config["steps_per_epoch"]
    for epoch in range(start, config["epochs"] + 1):
        t0 = time.time()
        rng.manual_seed(config["seed"] * 1000 + rank + 7919 * epoch)  # a resumed run draws the same batches
        tick = StepTicker(config if rank == 0 else {}, epoch)
        c_losses, g_losses, gps = steps.run(xs, ys, (epoch - 1) * per_epoch + 1, per_epoch, rng, tick)
        parts = gather((per_epoch, float(np.mean(c_losses)) if c_losses else 0.0,
                         float(np.mean(g_losses)) if g_losses else 0.0, float(np.mean(gps)) if gps else 0.0,
                         ray.get_runtime_context().get_node_id(), len(xs)))
        metrics = {"epoch": epoch, "critic_loss": round(float(np.mean([p[1] for p in parts])), 5),
                   "generator_loss": round(float(np.mean([p[2] for p in parts])), 5),
                   "gradient_penalty": round(float(np.mean([p[3] for p in parts])), 5),
                   "steps_per_worker": [p[0] for p in parts], "rows_per_worker": [p[5] for p in parts],
                   "node_per_worker": [p[4] for p in parts],
                   "seconds": round(time.time() - t0, 2)}
        if rank == 0:  # quality on the way: 4-mer distance of 512 samples to the training data
            sample = sample_sequences(steps.sampler(), 512, None, config["seed"] + epoch, config["labels"],
                                      temperature=config.get("temperature", 1.0))[0]
            metrics["kmer4_js"] = round(kmer_js(sample, config["reference"], 4), 5)
        history.append(metrics)
        if rank == 0:
            epoch_done(config, epoch, metrics)  # the driver's progress display
        with tempfile.TemporaryDirectory() as tmp:
            out = None
            if rank == 0:
                write_checkpoint_files(tmp, {"epoch": epoch, **steps.state_dict(), "history": history},
                                       {"epoch": epoch, "fingerprint": config["fingerprint"]})
                out = ray.train.Checkpoint.from_directory(tmp)
                print(f"[medray] gan epoch {epoch}/{config['epochs']}  critic {metrics['critic_loss']:.3f}  "
                      f"generator {metrics['generator_loss']:.3f}  gp {metrics['gradient_penalty']:.3f}  "
                      f"4-mer JS {metrics.get('kmer4_js')}  {metrics['seconds']}s", flush=True)
            ray.train.report(metrics, checkpoint=out)


# ----------------------------------------------------------------------------- sampling


@torch.inference_mode()
def sample_sequences(gen: DNAGenerator, n: int, label: int | None, seed: int, labels: list[str],
                     temperature: float = 1.0, classes=None, class_weights=None):
    """n sequences (and their class names) sampled from the generator; the same seed gives the same
    sequences. A base is drawn per position from softmax(logits / temperature). Unconditional
    models ignore `label`; for conditional ones the classes are `label`, else `classes` (one class
    index per sequence), else drawn with `class_weights` (the training data's class frequencies),
    else cycled through."""
    device = next(gen.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(n, gen.z_dim, generator=g)
    if not gen.conditional:
        y = torch.zeros(n, dtype=torch.long)
    elif label is not None:
        y = torch.full((n,), int(label))
    elif classes is not None:
        y = torch.as_tensor(np.asarray(classes), dtype=torch.long)
    elif class_weights is not None:
        y = torch.multinomial(torch.as_tensor(class_weights, dtype=torch.float), n, replacement=True, generator=g)
    else:
        y = torch.arange(n) % gen.n_classes
    logits = gen.logits(z.to(device), y.to(device)).float().cpu()  # (n, 4, L)
    probs = torch.softmax(logits / float(temperature), dim=1)
    flat = probs.permute(0, 2, 1).reshape(-1, 4)
    idx = torch.multinomial(flat, 1, generator=g).view(n, -1).numpy()
    letters = np.frombuffer(BASES.encode(), dtype=np.uint8)[idx]
    seqs = [row.tobytes().decode() for row in letters]
    names = [labels[int(v)] for v in y] if gen.conditional else [None] * n
    return seqs, names


def generate(bundle: Bundle, n: int, label: str | None = None, seed: int = 0, classes: list[str] | None = None,
             ) -> tuple[list[str], list]:
    """n sequences from a generator bundle. A conditional generator given no `label` draws the
    classes in the training data's proportions (or takes `classes`, one name per sequence)."""
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
    sampling = bundle.meta.get("sampling", {})
    idx = [labels.index(c) for c in classes] if classes is not None and conditional else None
    return sample_sequences(bundle.model, n, labels.index(label) if label is not None else None, seed, labels,
                            temperature=sampling.get("temperature", 1.0), classes=idx,
                            class_weights=sampling.get("class_weights"))


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


# class → (dinucleotide, side of the junction, name): where the splice-site consensus sits in a
# window centred on the junction. EI (exon→intron, donor): GT right after the centre; IE
# (intron→exon, acceptor): AG right before it. 99 % / 99.5 % of the real splice data carry them.
JUNCTIONS = {"EI": ("GT", "after", "donor"), "IE": ("AG", "before", "acceptor")}


def junction_motif_rate(seqs: list[str], motif: str = "GT", side: str = "after") -> float:
    """Fraction of sequences with `motif` right after (`side="after"`: positions c, c+1 with
    c = len // 2, a donor's GT) or right before (`"before"`: c-2, c-1, an acceptor's AG) the centre."""
    if not seqs:
        return 0.0
    if side not in ("after", "before"):
        raise ValueError(f"side must be 'after' or 'before', not {side!r}")

    def window(s):
        c = len(s) // 2
        return s[c : c + len(motif)] if side == "after" else s[c - len(motif) : c]

    return float(np.mean([window(s) == motif for s in seqs]))


def diversity(seqs: list[str], max_n: int = 600, seed: int = 0) -> dict:
    """Unique fraction, and the mean pairwise Hamming distance as a fraction of the length (over at
    most `max_n` sequences of the commonest length): a collapsed generator scores low on both."""
    if not seqs:
        return {"unique_fraction": 0.0, "mean_pairwise_distance": 0.0}
    length = max(set(map(len, seqs)), key=[len(s) for s in seqs].count)
    same = [s for s in seqs if len(s) == length]
    if len(same) > max_n:
        same = [same[i] for i in np.random.default_rng(seed).choice(len(same), max_n, replace=False)]
    x = SequenceEncoder(length).transform(same).reshape(len(same), -1).astype(np.float64)
    m = len(same)
    equal = x @ x.T  # positions with the same base (IUPAC codes fractionally)
    mean_equal = (equal.sum() - np.trace(equal)) / max(1, m * (m - 1))
    return {"unique_fraction": round(len(set(seqs)) / len(seqs), 4),
            "mean_pairwise_distance": round(float(1 - mean_equal / length), 4)}


# generated (and i.i.d. random) sequences `evaluate_gan` draws by default. k-mer JS between two
# samples grows with their sampling noise: 6-mer spectra have 4096 bins, and with a few hundred
# generated sequences that noise alone puts even real training sequences (other loci) at ~0.5× the
# random baseline's JS on held-out loci. Sampling is cheap, so the generated side is made large
# (5000: the same real training sequences then score ~0.40×); the reference stays the real half A.
EVAL_N = 5000


def evaluate_gan(bundle: Bundle, data: str, n: int | None = None, seed: int = 0, classifier: str | None = None) -> dict:
    """Generated vs. real (the sequences in `data`, held out from training when possible), beside two
    references computed the same way: i.i.d. random sequences with the real base composition, and a
    second real sample. Real data is split in two halves: A is the reference, B the second sample.
    `n` generated and random sequences (default: EVAL_N, or B's size if larger); the second real
    sample is B itself, so its figures carry B's (larger) sampling noise.
    A conditional generator generates its classes in A's proportions when `data` has labels it
    knows (else in the training data's). `summary` gathers the headline figures."""
    ds = read_genomic(localize(data), require_labels=False)
    length = bundle.meta["input_shape"][1]
    keep = [i for i, s in enumerate(ds.inputs) if len(s) == length]
    real = [ds.inputs[i] for i in keep]
    if len(real) < 20:
        raise DataError(f"{data}: fewer than 20 sequences of the generator's length {length}")
    real_labels = None if ds.labels is None else [str(ds.labels[i]) for i in keep]
    order = np.random.default_rng(seed).permutation(len(real))
    a = [real[i] for i in order[: len(real) // 2]]
    b = [real[i] for i in order[len(real) // 2 :]]
    n = n or max(len(b), EVAL_N)
    train_hashes = set(bundle.meta.get("training_hashes", []))
    conditional = bundle.meta["model"]["params"].get("conditional", False)
    classes = None
    if conditional and real_labels is not None:
        a_labels = [real_labels[i] for i in order[: len(real) // 2] if real_labels[i] in bundle.labels]
        if a_labels:  # n class names drawn from A's labels: the generated sample has A's class mix
            classes = [a_labels[i] for i in np.random.default_rng(seed + 2).integers(0, len(a_labels), n)]
    generated, _ = generate(bundle, n, seed=seed, classes=classes)
    random = random_like(a, n, length, seed + 1)
    report = {
        "n_generated": n, "n_reference": len(a), "n_second_real": len(b),
        "class_mix": "the real data's" if classes is not None else ("the training data's" if conditional else None),
        "generated": compare(generated, a, length, train_hashes),
        "random_baseline": compare(random, a, length, train_hashes),
        "second_real_sample": compare(b, a, length, train_hashes),
    }
    g, r, s = report["generated"], report["random_baseline"], report["second_real_sample"]
    summary = {
        "kmer6_js": {"generated": g["kmer_js_k6"], "random": r["kmer_js_k6"], "second_real": s["kmer_js_k6"],
                     "generated_to_random": round(g["kmer_js_k6"] / max(r["kmer_js_k6"], 1e-12), 4)},
        "position_freq_mae": {"generated": g["position_freq_mae"], "random": r["position_freq_mae"],
                              "second_real": s["position_freq_mae"]},
        "copies_of_training": g.get("copies_of_training"),
        "diversity": {"generated": diversity(generated, seed=seed), "second_real": diversity(b, seed=seed)},
    }
    if conditional and ds.labels is not None:
        per_class = {}
        if classifier:
            from medray.bundle import load_bundle

            clf = load_bundle(classifier)
        for lab in bundle.labels:
            gl, _ = generate(bundle, max(256, n // len(bundle.labels)), label=lab, seed=seed)
            rl = [x for x, y in zip(real, real_labels) if y == lab]
            per_class[lab] = {"generated_GT_after_centre": round(junction_motif_rate(gl, "GT", "after"), 4),
                              "real_GT_after_centre": round(junction_motif_rate(rl, "GT", "after"), 4),
                              "generated_AG_before_centre": round(junction_motif_rate(gl, "AG", "before"), 4),
                              "real_AG_before_centre": round(junction_motif_rate(rl, "AG", "before"), 4)}
            if lab in JUNCTIONS:
                motif, side, site = JUNCTIONS[lab]
                summary[f"{lab}_{motif}_{side}_centre ({site})"] = {
                    "generated": per_class[lab][f"generated_{motif}_{side}_centre"],
                    "real": per_class[lab][f"real_{motif}_{side}_centre"]}
            if classifier:
                pred = np.array(clf.labels)[clf.predict(gl).argmax(axis=1)]
                per_class[lab]["classifier_accuracy"] = round(float(np.mean(pred == lab)), 4)
        report["per_class"] = per_class
    report["summary"] = summary
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



# The default recipe (`medray train genomic-gan` without options); benchmarks/gan_quality.py measures
# it on held-out gene loci. Any key can be overridden through train_gan's keyword arguments.
RECIPE = {"epochs": 24, "batch_size": 32, "lr": 1e-4, "n_critic": 5, "gp_weight": 10.0, "steps_per_epoch": 500,
          "lr_decay": False, "ema": 0.0, "critic_input": "soft", "tau": 1.0, "real_smoothing": 0.0,
          "temperature": 1.0}
GENERATOR = {"z_dim": 64, "width": 256, "arch": "mlp", "channels": 32}
CRITIC = {"width": 256, "arch": "mlp", "projection": False, "channels": 64, "kmer": 0, "kmer_size": 6}


def train_gan(data: str, out: str, *, workers: int = 2, gpu: bool = False, storage: str | None = None,
              name: str | None = None, seed: int = 0, conditional: bool | None = None, generator: dict | None = None,
              critic: dict | None = None, max_failures: int = 2, address: str | None = None,
              placement_strategy: str = "PACK", skip_bad: bool = False, log=say, label: str | None = None,
              **options) -> dict:
    """Train the GAN on `data` as a Ray Train job and write the generator bundle to `out`.
    `conditional`: condition on the labels (True requires them; None, the default: when the data
    has labels). `options` override RECIPE's keys (epochs, lr, n_critic, ...); `generator` /
    `critic` override GENERATOR's / CRITIC's."""
    from medray.ray_runtime import ensure_ray

    unknown = sorted(set(options) - set(RECIPE) - {"z_dim"}) + sorted(set(generator or {}) - set(GENERATOR)) \
        + sorted(set(critic or {}) - set(CRITIC))
    if unknown:
        raise MedrayError(f"unknown GAN option(s): {', '.join(unknown)}")
    recipe = {**RECIPE, **{k: v for k, v in options.items() if k in RECIPE}}
    gen_params = {**GENERATOR, **({"z_dim": options["z_dim"]} if "z_dim" in options else {}), **(generator or {})}
    critic_params = {**CRITIC, **(critic or {})}
    epochs, batch_size, lr = recipe["epochs"], recipe["batch_size"], recipe["lr"]
    if epochs < 1 or batch_size < 2 or workers < 1 or lr <= 0 or recipe["n_critic"] < 1 or recipe["temperature"] <= 0:
        raise MedrayError("epochs, workers and n_critic must be at least 1, batch size at least 2, the learning rate "
                          "and temperature positive")
    source = pipeline.open_source("genomic", data, require_labels=bool(conditional))
    ensure_ray(address)
    keys = pipeline.read_keys(source, skip_bad=skip_bad, require_labels=bool(conditional))  # on the cluster
    if conditional is None:
        conditional = keys.labels is not None
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
    arch = {"name": "dna_generator", "params": {**gen_params, "conditional": conditional}}
    fingerprint = pipeline.fingerprint(keys, {"labels": labels, "task": TASK, "length": length})
    name = name or f"{TASK}-{run_key(fingerprint, arch, critic_params, recipe, seed, workers)[:10]}"
    storage = resolve_run_storage(storage, name, fingerprint, epochs, log)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(keep, min(2000, len(keep)), replace=False))
    reference = [str(s) for s in pipeline.collect_inputs(source, keys.keys[sample])]
    config = {"length": length, "labels": labels, "conditional": conditional, "generator": arch["params"],
              "critic": critic_params, "seed": seed, "gpu": gpu, "fingerprint": fingerprint, "reference": reference,
              **recipe}
    log(f"[medray] {TASK}: {len(keep)} sequences of length {length} from {data}"
        f"{' (conditional on ' + ', '.join(labels) + ')' if conditional else ''}; {workers} worker(s) on "
        f"{'GPU' if gpu else 'CPU'}; run {name!r} in {storage}")
    label_index = {c: i for i, c in enumerate(labels)} if conditional else None
    datasets = {"train": pipeline.dataset(source, keys.keys[keep], enc, label_index, shuffle_seed=seed)}
    state, seconds = run_trainer(gan_loop_per_worker, config, datasets, name=name, storage=storage, workers=workers,
                                 gpu=gpu, max_failures=max_failures, placement_strategy=placement_strategy,
                                 num_to_keep=3, label=label or TASK)
    counts = np.array([int((keys.labels[keep] == c).sum()) for c in labels], dtype=float)
    meta = {
        "name": Path(out).name, "task": TASK, "model": arch,
        "training": {**recipe, "critic": critic_params, "optimizer": "Adam(0.5, 0.9)", "loss": "WGAN-GP",
                     "seed": seed, "workers": workers, "gpu": gpu, "epochs_trained": state["epoch"],
                     "run_name": name, "storage_path": storage, "seconds": seconds},
        "preprocessing": enc.to_dict(), "labels": labels, "input_shape": [4, length],
        "input": {"type": "noise", "z_dim": gen_params["z_dim"], "conditional": conditional, "length": length},
        # how `generate` samples: the temperature on the logits, and (conditional, no label given)
        # classes drawn in the training data's proportions
        "sampling": {"temperature": recipe["temperature"],
                     **({"class_weights": [round(float(c), 6) for c in counts / counts.sum()]} if labels else {})},
        "data": {"source": str(data), "sequences": int(len(keep)), "fingerprint": fingerprint,
                 **({"skipped": skipped_summary(keys)} if skipped_summary(keys) else {})},
        # hashes only (no sequences): enough to measure memorisation without shipping the training data
        "training_hashes": sorted(set(keys.rows["_seqhash"].iloc[keep].tolist())),
        "metrics": {"history": state["history"]},
    }
    weights = state.get("generator_ema", state["generator"])  # the EMA generator when there is one
    path = write_bundle(out, weights, meta, extra=lambda folder, full: _report(folder, reference, seed))
    log(f"[medray] generator bundle written to {path}")
    return meta
