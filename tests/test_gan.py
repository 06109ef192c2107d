"""The genomic GAN on the real splice data: two Ray Train workers, measured against real and random
sequences, seeded generation, the CLI, and the generate endpoint's bad requests."""

import json
import subprocess
import sys

import numpy as np
import pytest
from Bio import SeqIO

from conftest import shared
from medray.bundle import load_bundle
from medray.gan import evaluate_gan, generate, js_divergence, kmer_js, kmer_spectrum, random_like

pytestmark = pytest.mark.ray


def test_metrics_measure_what_they_say():
    assert js_divergence(kmer_spectrum(["ACGT" * 10], 2), kmer_spectrum(["ACGT" * 10], 2)) == 0
    assert js_divergence(kmer_spectrum(["AAAA"], 1), kmer_spectrum(["CCCC"], 1)) == pytest.approx(1.0)
    real = ["ACGTTGCA" * 8] * 50
    rnd = random_like(real, 50, 64, seed=0)
    assert kmer_js(rnd, real, 3) > 0.2 and kmer_spectrum(rnd, 1) == pytest.approx([0.25] * 4, abs=0.05)


def test_junction_rates_are_read_at_the_junction_for_each_side():
    from medray.gan import JUNCTIONS, junction_motif_rate

    centre = 30
    donor = "A" * centre + "GT" + "A" * 28  # GT at positions 30-31: right after the centre
    acceptor = "C" * 28 + "AG" + "C" * centre  # AG at positions 28-29: right before the centre
    assert junction_motif_rate([donor], "GT", "after") == 1 and junction_motif_rate([donor], "GT", "before") == 0
    assert junction_motif_rate([acceptor], "AG", "before") == 1 and junction_motif_rate([acceptor], "AG", "after") == 0
    shifted = "C" * 29 + "AG" + "C" * 29  # one base off: not an acceptor at this junction
    assert junction_motif_rate([acceptor, shifted], "AG", "before") == 0.5
    assert JUNCTIONS["EI"][:2] == ("GT", "after") and JUNCTIONS["IE"][:2] == ("AG", "before")
    # the real data: ~99 % of donors carry GT after the centre, ~99.5 % of acceptors AG before it
    rows = [line.split(",") for line in shared("genomic", "splice.csv").read_text().splitlines()[1:]]
    ei = [s for _, s, y in rows if y == "EI"]
    ie = [s for _, s, y in rows if y == "IE"]
    assert junction_motif_rate(ei, "GT", "after") > 0.98 and junction_motif_rate(ie, "AG", "before") > 0.98
    assert junction_motif_rate(ie, "GT", "after") < 0.3 and junction_motif_rate(ei, "AG", "before") < 0.6


def test_diversity_tells_collapse_from_variety():
    from medray.gan import diversity

    assert diversity(["ACGT" * 15] * 20) == {"unique_fraction": 0.05, "mean_pairwise_distance": 0.0}
    d = diversity(random_like(["ACGT"], 300, 60, seed=0))
    assert d["unique_fraction"] == 1.0 and abs(d["mean_pairwise_distance"] - 0.75) < 0.02


@pytest.mark.parametrize("gen_arch,critic_arch,projection,critic_input", [
    ("mlp", "mlp", False, "soft"), ("conv", "conv", True, "hard"), ("mlp", "conv", True, "soft")])
def test_networks_and_one_training_step(gen_arch, critic_arch, projection, critic_input):
    """Each generator/critic combination builds, takes a WGAN-GP step in one process (no Ray), and
    samples: temperature, explicit classes and class weights."""
    import torch

    from medray.gan import GanSteps, sample_sequences

    config = {"length": 60, "labels": ["EI", "IE", "N"], "conditional": True, "seed": 0, "epochs": 1,
              "steps_per_epoch": 2, "batch_size": 8, "lr": 1e-3, "n_critic": 1, "gp_weight": 10.0,
              "critic_input": critic_input, "ema": 0.9, "lr_decay": True,
              "generator": {"z_dim": 8, "width": 32, "arch": gen_arch, "channels": 8, "conditional": True},
              "critic": {"width": 32, "arch": critic_arch, "projection": projection, "channels": 8}}
    torch.manual_seed(0)
    steps = GanSteps(config, torch.device("cpu"))
    xs = torch.nn.functional.one_hot(torch.randint(0, 4, (16, 60)), 4).permute(0, 2, 1).float()
    ys = torch.randint(0, 3, (16,))
    before = [p.clone() for p in steps.gen.parameters()]
    c, g, gp = steps.run(xs, ys, 1, 2, torch.Generator().manual_seed(0))
    assert len(c) == 2 and len(g) == 2 and all(np.isfinite(c + g + gp))
    assert any(not torch.equal(a, b) for a, b in zip(before, steps.gen.parameters()))
    ema = steps.sampler()
    assert ema is not steps.gen and any(not torch.equal(a, b) for a, b in zip(ema.parameters(), steps.gen.parameters()))
    probs = ema(torch.zeros(4, 8), torch.tensor([0, 1, 2, 0]))
    assert probs.shape == (4, 4, 60) and torch.allclose(probs.sum(dim=1), torch.ones(4, 60))
    seqs, names = sample_sequences(ema, 6, None, 1, config["labels"], classes=[2, 2, 1, 0, 0, 0])
    assert names == ["N", "N", "IE", "EI", "EI", "EI"] and all(len(s) == 60 for s in seqs)
    _, names = sample_sequences(ema, 200, None, 1, config["labels"], class_weights=[0.0, 0.25, 0.75])
    assert "EI" not in names and 110 < names.count("N") < 190
    # temperature → 0 samples the most likely base at every position
    cold, _ = sample_sequences(ema, 3, 0, 1, config["labels"], temperature=1e-4)
    best = ema.logits(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(3, dtype=torch.long))
    argmax = ["".join("ACGT"[i] for i in row) for row in best.argmax(dim=1).tolist()]
    assert np.mean([a == b for s, t in zip(cold, argmax) for a, b in zip(s, t)]) > 0.95  # (near-ties aside)


def test_conditional_is_the_cli_default_and_can_be_turned_off():
    from medray.cli import build_parser

    base = ["train", "genomic-gan", "--data", "x.fasta", "--out", "b"]
    parse = build_parser().parse_args
    # None: train_gan conditions on the labels when the data has them (the session fixture relies on it)
    assert parse(base).conditional is None
    assert parse([*base, "--conditional"]).conditional is True
    assert parse([*base, "--no-conditional"]).conditional is False


def test_two_workers_train_a_generator_far_closer_to_real_dna_than_random(gan):
    meta, path = gan
    history = meta["metrics"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert all(h["steps_per_worker"] == [500, 500] for h in history)
    # each worker drew its batches from its own shard: about half of the sequences each
    assert all(abs(r - 2231 / 2) < 0.05 * 2231 for r in history[-1]["rows_per_worker"])
    report = evaluate_gan(load_bundle(path), str(shared("genomic", "splice.fasta")), n=1000, seed=1)
    g, rnd, real = report["generated"], report["random_baseline"], report["second_real_sample"]
    for k, margin in ((3, 0.6), (4, 0.6), (5, 0.8)):
        # a clear margin: measured 0.42, 0.48, 0.59 of the random baseline's distance after this short run
        assert g[f"kmer_js_k{k}"] < margin * rnd[f"kmer_js_k{k}"], (k, g, rnd)
    assert real["kmer_js_k4"] < g["kmer_js_k4"]  # a second real sample is closer still, as it should be
    assert g["copies_of_training"] < 0.05
    assert set(report["per_class"]) == {"EI", "IE", "N"}
    # the bundle's report: curves, k-mer spectra, per-position frequencies, and a card stating them
    from PIL import Image

    from medray.report import GAN_PICTURES

    folder = path / "report"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*GAN_PICTURES, "model_card.md"])
    for name in GAN_PICTURES:
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.width >= 400 and len(set(im.convert("L").get_flattened_data())) > 20, name
    card = (folder / "model_card.md").read_text()
    assert "| kmer_js_k6 |" in card and "| copies_of_training |" in card


def test_seeded_generation_is_reproducible_and_labelled(gan):
    _, path = gan
    bundle = load_bundle(path)
    a, labels_a = generate(bundle, 8, label="EI", seed=7)
    b, _ = generate(bundle, 8, label="EI", seed=7)
    c, _ = generate(bundle, 8, label="EI", seed=8)
    assert a == b and a != c and labels_a == ["EI"] * 8
    assert all(len(s) == 60 and set(s) <= set("ACGT") for s in a)


def test_cli_generate_writes_fasta_and_evaluate_prints_references(gan, tmp_path):
    _, path = gan
    out = tmp_path / "gen.fasta"
    r = subprocess.run([sys.executable, "-m", "medray", "generate", str(path), "--n", "5", "--label", "IE",
                        "--seed", "3", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    records = list(SeqIO.parse(out, "fasta"))
    assert len(records) == 5 and all("label=IE" in rec.description for rec in records)
    bad = subprocess.run([sys.executable, "-m", "medray", "generate", str(path), "--label", "XX"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown label 'XX'" in bad.stderr
    r = subprocess.run([sys.executable, "-m", "medray", "evaluate", str(path), "--data",
                        str(shared("genomic", "splice.fasta")), "--n", "300"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert {"generated", "random_baseline", "second_real_sample"} <= set(report)
    assert {f"kmer_js_k{k}" for k in range(1, 7)} <= set(report["generated"])
    assert np.isfinite(report["generated"]["gc_wasserstein"])
