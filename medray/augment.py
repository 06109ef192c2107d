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
Time series (N, F) with a (C, T) layout: `time_shift` (random circular shift, fraction of T),
`scale` (random per-channel amplitude scaling).
"""

from __future__ import annotations

import torch


def augment_batch(x: torch.Tensor, spec: dict, input_shape, generator: torch.Generator | None = None) -> torch.Tensor:
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
        if spec.get("time_shift"):
            m = int(spec["time_shift"] * t)
            shifts = ((rand(n) * (2 * m + 1)).long() - m).tolist()
            x = torch.stack([torch.roll(x[i], shifts[i], dims=-1) for i in range(n)])
        if spec.get("scale"):
            x = x * (1 + (rand(n, c, 1) * 2 - 1) * spec["scale"])
        return x.reshape(original)
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
