"""Training-time augmentation on batches (tensors), configured per model in the presets.

Images (N, 1, H, W), per image with `torchvision.transforms.v2`: `hflip` (RandomHorizontalFlip),
`shift` (random translation, fraction of the side: RandomCrop of the edge-padded image),
`rotate` (RandomRotation, ± degrees), `crop_scale` ([lo, hi]: RandomResizedCrop keeping that share
of the area, aspect 3/4..4/3), then per batch `brightness` (additive/multiplicative jitter) and
`contrast` (scaling about each image's mean), in normalised units: torchvision's ColorJitter
assumes [0, 1] pixels and clamps to them, which would destroy standardised inputs.
The torchvision draws come from torch's global generator inside `torch.random.fork_rng`, reseeded
from `generator` once per batch: the same seed gives the same augmentation, and the training
loop's own random stream (dropout) is not disturbed.
Time series (N, F) with a (C, T) layout: `rotate` (± degrees: one random 3-D rotation per window,
applied alike to every consecutive xyz triplet of channels, i.e. the accelerometer and the gyroscope,
in sensor units: a watch worn at a slightly different angle), `time_shift` (random circular shift,
fraction of T), `scale` (random per-channel amplitude scaling).
`mixup` (`mix`, Zhang et al. 2018) blends pairs of examples and their labels; it is a recipe entry
(`train.mixup: alpha`), applied by the training loop after the augmentations above.
"""

from __future__ import annotations

import numpy as np
import torch


def check_spec(spec: dict, input_shape) -> None:
    """Refuse, before training starts, an augmentation the input cannot take."""
    if len(input_shape) == 2 and (spec or {}).get("rotate") and input_shape[0] % 3:
        raise ValueError(f"augment rotate: the series has {input_shape[0]} channels; rotation needs xyz "
                         f"triplets (accelerometer, gyroscope), a multiple of 3")


def augment_batch(x: torch.Tensor, spec: dict, input_shape, generator: torch.Generator | None = None,
                  stats=None) -> torch.Tensor:
    """`stats` = (mean, std) per feature, the fitted scaler's: the time-series `rotate` undoes the
    standardisation, rotates in sensor units and standardises again."""
    if not spec:
        return x
    n = x.shape[0]
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    if len(input_shape) == 3:  # images
        transform = _image_transform(spec, tuple(input_shape[1:]))
        if transform is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if spec.get("rotate"):  # rotated corners filled with each image's darkest value, not 0
                    lows = x.amin(dim=(1, 2, 3), keepdim=True).cpu()
                    x = torch.stack([transform(img) for img in x.cpu() - lows]) + lows
                else:
                    x = torch.stack([transform(img) for img in x.cpu()])
                x = x.to(dev)
        if spec.get("brightness"):
            b = spec["brightness"]
            x = x * (1 + (rand(n, 1, 1, 1) * 2 - 1) * b) + (rand(n, 1, 1, 1) * 2 - 1) * b
        if spec.get("contrast"):
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + (rand(n, 1, 1, 1) * 2 - 1) * spec["contrast"]) + mean
        return x
    if len(input_shape) == 2:  # (channels, time) series stored flat
        c, t = input_shape
        original = x.shape
        x = x.reshape(n, c, t)
        if spec.get("rotate"):
            x = _rotate_triplets(x, float(spec["rotate"]), rand, stats)
        if spec.get("time_shift"):
            m = int(spec["time_shift"] * t)
            shifts = ((rand(n) * (2 * m + 1)).long() - m).tolist()
            x = torch.stack([torch.roll(x[i], shifts[i], dims=-1) for i in range(n)])
        if spec.get("scale"):
            x = x * (1 + (rand(n, c, 1) * 2 - 1) * spec["scale"])
        return x.reshape(original)
    return x


def mix(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None):
    """Mixup: (x', y, y_partner, lam) with x' = lam·x + (1 − lam)·x[partner], lam ~ Beta(alpha, alpha);
    the loss is lam·loss(y) + (1 − lam)·loss(y_partner). Seeded from `generator`."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    partner = torch.randperm(len(y), generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[partner], y, y[partner], lam


def _rotate_triplets(x: torch.Tensor, degrees: float, rand, stats) -> torch.Tensor:
    """x (N, C, T), C a multiple of 3: each window's xyz triplets turned by one random rotation
    (angles uniform in ± `degrees` about each axis)."""
    import math

    n, c, t = x.shape
    check_spec({"rotate": degrees}, (c, t))
    if stats is not None:
        mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(c, t) for v in stats)
        x = x * std + mean
    a = (rand(n, 3) * 2 - 1) * math.radians(degrees)
    cos, sin, one, zero = a.cos(), a.sin(), torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
    rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1).view(n, 3, 3)
    ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1).view(n, 3, 3)
    rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1).view(n, 3, 3)
    r = rx @ ry @ rz
    x = torch.cat([r @ x[:, i:i + 3] for i in range(0, c, 3)], dim=1)
    if stats is not None:
        x = (x - mean) / std
    return x


_TRANSFORMS: dict = {}


def _image_transform(spec: dict, hw: tuple):
    """The torchvision.transforms.v2 pipeline of an image spec (None when it has no geometric part);
    built once per (spec, size)."""
    key = (tuple(sorted((k, str(v)) for k, v in spec.items())), hw)
    if key not in _TRANSFORMS:
        from torchvision.transforms import v2

        steps = []
        if spec.get("crop_scale"):
            lo, hi = spec["crop_scale"]
            steps.append(v2.RandomResizedCrop(hw, scale=(float(lo), float(hi)), antialias=True))
        if spec.get("rotate"):
            steps.append(v2.RandomRotation(float(spec["rotate"]), interpolation=v2.InterpolationMode.BILINEAR))
        if spec.get("shift"):
            m = int(spec["shift"] * min(hw))
            if m > 0:
                steps.append(v2.RandomCrop(hw, padding=m, padding_mode="edge"))
        if spec.get("hflip"):
            steps.append(v2.RandomHorizontalFlip())
        _TRANSFORMS[key] = v2.Compose(steps) if steps else None
    return _TRANSFORMS[key]
