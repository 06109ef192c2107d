"""Model architectures, built by name from the JSON spec stored in a bundle.

`build_model({"name": ..., "params": {...}}, input_shape, n_classes)` is the only constructor
that training and serving use. Every model maps (N, *input_shape) float32 to (N, n_classes) logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected baseline: hidden layers with ReLU and dropout (exercise: 64-64, p=0.2)."""

    def __init__(self, input_shape, n_classes, hidden=(64, 64), dropout=0.2):
        super().__init__()
        layers, width = [nn.Flatten()], math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ConvNet1d(nn.Module):
    """1-D CNN over (channels, length): sensor windows (6 × 100) or one-hot DNA (4 × L).

    Blocks of conv → BatchNorm → ReLU (→ max-pool between blocks), then global max and average
    pooling, dropout and a linear classifier.
    """

    def __init__(self, input_shape, n_classes, channels=(64, 64), kernel_size=7, dropout=0.3, pool=2, batch_norm=True):
        super().__init__()
        in_ch = input_shape[0] if len(input_shape) == 2 else 1
        self.shape = (in_ch, input_shape[-1])
        blocks = []
        for i, ch in enumerate(channels):
            blocks += [nn.Conv1d(in_ch, ch, kernel_size, padding=kernel_size // 2)]
            blocks += [nn.BatchNorm1d(ch)] if batch_norm else []
            blocks += [nn.ReLU()]
            if pool > 1 and i < len(channels) - 1:
                blocks.append(nn.MaxPool1d(pool))
            in_ch = ch
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * in_ch, n_classes))

    def forward(self, x):
        h = self.features(x.reshape(x.shape[0], *self.shape))
        return self.head(torch.cat([h.amax(dim=-1), h.mean(dim=-1)], dim=1))


class PositionalCNN1d(nn.Module):
    """1-D CNN that keeps position: conv → BN → ReLU → max-pool, then flatten → hidden → classes.

    For fixed-length DNA windows whose signal sits at a fixed place (a splice junction's GT/AG):
    global pooling throws that position away (measured: 0.87 vs 0.97 on grouped splice CV).
    """

    def __init__(self, input_shape, n_classes, channels=32, kernel_size=7, pool=4, hidden=64, dropout=0.5):
        super().__init__()
        in_ch, length = input_shape
        self.shape = (in_ch, length)
        self.features = nn.Sequential(
            nn.Conv1d(in_ch, channels, kernel_size, padding=kernel_size // 2), nn.BatchNorm1d(channels),
            nn.ReLU(), nn.MaxPool1d(pool), nn.Flatten(), nn.Dropout(dropout),
        )
        self.head = nn.Sequential(nn.Linear(channels * (length // pool), hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_classes))

    def forward(self, x):
        return self.head(self.features(x.reshape(x.shape[0], *self.shape)))


class ConvRecurrent1d(nn.Module):
    """Convolution for local motifs, then a bidirectional GRU over the pooled positions, so the
    classifier sees motifs in order and where they sit: conv → BN → ReLU → max-pool → BiGRU →
    mean+max over positions → dropout → linear (DanQ-style, small)."""

    def __init__(self, input_shape, n_classes, channels=64, kernel_size=9, pool=2, hidden=48, dropout=0.3):
        super().__init__()
        self.shape = tuple(input_shape)
        self.conv = nn.Sequential(nn.Conv1d(input_shape[0], channels, kernel_size, padding=kernel_size // 2),
                                  nn.BatchNorm1d(channels), nn.ReLU(), nn.MaxPool1d(pool), nn.Dropout(dropout / 2))
        self.rnn = nn.GRU(channels, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * hidden, n_classes))

    def forward(self, x):
        h = self.conv(x.reshape(x.shape[0], *self.shape)).transpose(1, 2)
        out, _ = self.rnn(h)
        return self.head(torch.cat([out.mean(dim=1), out.amax(dim=1)], dim=1))


class RecurrentNet(nn.Module):
    """Bidirectional GRU/LSTM over the sequence positions; mean+max pooled states → linear."""

    def __init__(self, input_shape, n_classes, cell="gru", hidden=64, layers=1, dropout=0.2):
        super().__init__()
        self.shape = tuple(input_shape)
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn(input_shape[0], hidden, num_layers=layers, batch_first=True, bidirectional=True,
                       dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * hidden, n_classes))

    def forward(self, x):
        out, _ = self.rnn(x.reshape(x.shape[0], *self.shape).transpose(1, 2))
        return self.head(torch.cat([out.mean(dim=1), out.amax(dim=1)], dim=1))


class SimpleCNN(nn.Module):
    """The ultrasound baseline: conv16-pool-conv32-pool-fc128 on 1 × 128 × 128."""

    def __init__(self, input_shape, n_classes, dropout=0.3):
        super().__init__()
        c, h, w = input_shape
        self.net = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(128, n_classes),
        )

    def forward(self, x):
        return self.net(x)


class ConvNet2d(nn.Module):
    """A stronger small image CNN: stages of 3×3 conv-BN then max-pool and ReLU, global average
    pooling, dropout, linear. Trained from scratch (no downloaded weights).

    Two choices that change no result, only the speed (the ultrasound default, batch 32, forward +
    backward + AdamW on this 2-core CPU, 2026-12-07: 315 → 141 ms per step on 1 thread, 129 → 83 ms
    on 2): ReLU after the max-pool (the two commute exactly, values and gradients; ReLU then sees a
    quarter of the elements), and channels-last (NHWC) weights and activations, the layout oneDNN's
    convolutions and pooling run fastest on (NCHW costs a reorder per layer). Parameter names are
    unchanged, so bundles written before load as they were."""

    def __init__(self, input_shape, n_classes, widths=(16, 32, 64, 128), dropout=0.3):
        super().__init__()
        layers, c = [], input_shape[0]
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.MaxPool2d(2), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, n_classes))
        self.to(memory_format=torch.channels_last)  # the 4-D conv weights; `.to(device)` keeps the layout

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.features(x).mean(dim=(2, 3)))


class ResidualBlock2d(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class ResNet2d(nn.Module):
    """A small ResNet for grayscale scans trained from scratch: a strided 5×5 stem, one residual
    block per stage (stride 2 from the second), global average pooling, dropout, linear."""

    def __init__(self, input_shape, n_classes, widths=(24, 48, 96, 192), dropout=0.3):
        super().__init__()
        c = widths[0]
        layers = [nn.Conv2d(input_shape[0], c, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        for i, w in enumerate(widths):
            layers.append(ResidualBlock2d(c, w, 1 if i == 0 else 2))
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, n_classes))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class DNAGenerator(nn.Module):
    """noise (+ class embedding) → (4, length) per-position base probabilities (softmax over A/C/G/T).

    `arch="mlp"`: an MLP over the whole sequence, every position can depend on every other.
    `arch="conv"`: the same MLP emits a (channels, length) feature map instead of logits, and two
    1-D convolutions (a residual block) turn it into logits, so neighbouring bases are shaped
    together (k-mers) at little cost on a CPU. `logits()` gives the pre-softmax scores (sampling
    with a temperature divides them)."""

    def __init__(self, input_shape, n_classes: int, z_dim: int = 64, width: int = 256, conditional: bool = False,
                 arch: str = "mlp", channels: int = 32, kernel_size: int = 5):
        super().__init__()
        self.length, self.z_dim, self.conditional = int(input_shape[1]), int(z_dim), bool(conditional)
        self.n_classes, self.arch, self.channels = int(n_classes), str(arch), int(channels)
        if self.arch not in ("mlp", "conv"):
            raise ValueError(f"unknown generator arch {arch!r} (mlp, conv)")
        emb = 16 if self.conditional else 0
        self.embed = nn.Embedding(max(self.n_classes, 1), emb) if self.conditional else None
        out = 4 * self.length if self.arch == "mlp" else self.channels * self.length
        self.net = nn.Sequential(nn.Linear(self.z_dim + emb, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, out))
        if self.arch == "conv":
            pad = kernel_size // 2
            self.block = nn.Sequential(nn.ReLU(), nn.Conv1d(self.channels, self.channels, kernel_size, padding=pad),
                                       nn.ReLU(), nn.Conv1d(self.channels, self.channels, kernel_size, padding=pad))
            self.head = nn.Conv1d(self.channels, 4, kernel_size, padding=pad)

    def logits(self, z, labels=None):
        if self.conditional:
            z = torch.cat([z, self.embed(labels)], dim=1)
        if self.arch == "mlp":
            return self.net(z).view(len(z), 4, self.length)
        h = self.net(z).view(len(z), self.channels, self.length)
        return self.head(torch.relu(h + self.block(h)))

    def forward(self, z, labels=None):
        return torch.softmax(self.logits(z, labels), dim=1)


class DNACritic(nn.Module):
    """(4, length) [+ class] → a score, with no normalisation layers (the gradient penalty is per
    sample). `arch="mlp"`: an MLP over the flattened sequence; `arch="conv"`: two 1-D convolutions
    (local motifs, k-mers) whose flattened map (position kept) feeds the same MLP head. `kmer=C`
    adds C convolutional k-mer detectors averaged over positions beside the MLP's features.
    The class enters either as a one-hot concatenated to the input (`projection=False`) or as a
    projection term <embed(class), h> on the last hidden layer (Miyato & Koyama 2018), which makes
    the critic judge each sample against its own class."""

    def __init__(self, length: int, n_classes: int = 0, width: int = 256, arch: str = "mlp",
                 projection: bool = False, channels: int = 64, kernel_size: int = 5, kmer: int = 0,
                 kmer_size: int = 6):
        super().__init__()
        self.n_classes, self.length, self.arch = int(n_classes), int(length), str(arch)
        self.projection = bool(projection) and self.n_classes > 0
        concat = 0 if self.projection else self.n_classes
        if self.arch == "mlp":
            self.features = nn.Flatten()
            flat = 4 * self.length + concat
        elif self.arch == "conv":
            pad = kernel_size // 2
            self.features = nn.Sequential(nn.Conv1d(4, channels, kernel_size, padding=pad), nn.LeakyReLU(0.2),
                                          nn.Conv1d(channels, channels, kernel_size, padding=pad), nn.LeakyReLU(0.2),
                                          nn.Flatten())
            flat = channels * self.length + concat
        else:
            raise ValueError(f"unknown critic arch {arch!r} (mlp, conv)")
        self.net = nn.Sequential(nn.Linear(flat, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2))
        # k-mer branch: `kmer` detectors of `kmer_size` bases averaged over all positions, i.e. the
        # sequence's k-mer spectrum as the critic sees it (position-blind, which the MLP is not)
        # (a linear layer on the unfolded windows: on a CPU far cheaper than Conv1d's double backward)
        self.kmer_size = int(kmer_size)
        self.kmer = nn.Linear(4 * self.kmer_size, kmer) if kmer else None
        feats = width + int(kmer)
        self.out = nn.Linear(feats, 1)
        self.embed = nn.Embedding(self.n_classes, feats) if self.projection else None

    def forward(self, x, labels=None):
        h = self.features(x)
        if self.n_classes and not self.projection:
            h = torch.cat([h, torch.nn.functional.one_hot(labels, self.n_classes).to(h.dtype)], dim=1)
        h = self.net(h)
        if self.kmer is not None:
            windows = x.unfold(2, self.kmer_size, 1).permute(0, 2, 1, 3).flatten(2)  # (N, L-k+1, 4k)
            h = torch.cat([h, torch.nn.functional.leaky_relu(self.kmer(windows), 0.2).mean(dim=1)], dim=1)
        score = self.out(h).squeeze(1)
        if self.projection:
            score = score + (self.embed(labels) * h).sum(dim=1)
        return score


class Ensemble(nn.Module):
    """`members` copies of one architecture (different initial weights), trained side by side on
    the same batches, each on its own loss (`forward(x, members=True)`), and predicting together: forward
    returns log(mean of the members' softmax), so softmax(forward) is the averaged probability.
    A preset asks for it with `ensemble: N`; the bundle stores it as one model."""

    def __init__(self, input_shape, n_classes, members=3, member=None):
        super().__init__()
        self.members = nn.ModuleList(build_model(member, input_shape, n_classes) for _ in range(int(members)))

    def forward(self, x, members: bool = False):
        """log of the averaged probabilities; with `members`, each member's logits (members, N, classes)
        (training: called through DDP like any forward, so the gradients are synchronised)."""
        logits = torch.stack([m(x) for m in self.members])
        if members:
            return logits
        return torch.logsumexp(torch.log_softmax(logits.float(), dim=-1), dim=0) - math.log(len(self.members))


# name -> constructor(input_shape, n_classes, **params); which task offers which model is in presets/
MODELS = {
    "mlp": MLP,
    "cnn1d": ConvNet1d,
    "poscnn": PositionalCNN1d,
    "cnn_gru": ConvRecurrent1d,
    "gru": lambda s, n, **p: RecurrentNet(s, n, cell="gru", **p),
    "lstm": lambda s, n, **p: RecurrentNet(s, n, cell="lstm", **p),
    "cnn": SimpleCNN,
    "convnet": ConvNet2d,
    "resnet": ResNet2d,
    "ensemble": Ensemble,  # {"members": N, "member": {"name": ..., "params": ...}}
    "dna_generator": DNAGenerator,  # the GAN's generator (medray.gan); n_classes = conditioning classes
}


def preset_arch(preset: dict) -> dict:
    """The architecture a preset entry names (`medray.tasks.load_preset`): {"name", "params"}, wrapped
    as an ensemble of N members when it sets `ensemble: N`."""
    arch = {"name": preset["name"], "params": preset.get("params", {})}
    if int(preset.get("ensemble", 1)) > 1:  # N members of the architecture, one model in the bundle
        arch = {"name": "ensemble", "params": {"members": int(preset["ensemble"]), "member": arch}}
    return arch


def describe(arch: dict) -> str:
    """A model's short name: `cnn1d`, or `cnn1d×3` for an ensemble of three."""
    if arch["name"] == "ensemble":
        return f"{arch['params']['member']['name']}×{arch['params']['members']}"
    return arch["name"]


_FUSABLE = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d))


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """`model` (in eval mode) with every convolution that a batch norm follows in a Sequential
    folded into one convolution (`torch.nn.utils.fusion.fuse_conv_bn_eval`), in place: the same
    outputs (to float rounding, ~1e-6) with one module and one pass over the activations fewer.
    Measured on the default exercise ensemble, one CPU thread: 2.04 → 1.55 ms for one window,
    20.4 → 14.8 ms for 64. For loaded bundles only: the folded model is not for training."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fuse_for_inference: the model must be in eval mode")
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        items, fused = list(seq), []
        while items:
            head = items.pop(0)
            if items and any(isinstance(head, c) and type(items[0]) is b for c, b in _FUSABLE):
                head = fuse_conv_bn_eval(head, items.pop(0))
            fused.append(head)
        if len(fused) < len(seq):
            seq._modules.clear()
            for i, m in enumerate(fused):
                seq.add_module(str(i), m)
    return model


def build_model(arch: dict, input_shape, n_classes: int) -> nn.Module:
    name = arch["name"]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    return MODELS[name](list(input_shape), int(n_classes), **arch.get("params", {}))
