"""InstDisc's augmentations, batched on tensors (fast on CPU and GPU alike).

Per image (strengths from `AugmentConfig`; defaults in brackets): random resized
crop (area scale crop_min-1 [0.5], aspect 3/4-4/3), colour jitter [0.4] (brightness,
contrast, saturation, hue), random grayscale [p=0.2], horizontal flip [p=0]. The crop
is one `affine_grid` + `grid_sample` for the whole batch, so small images cost no
per-image Python.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainer.config import AugmentConfig

# The crop's aspect ratio range (torchvision's RandomResizedCrop default).
CROP_RATIO = (3 / 4, 4 / 3)


def _uniform(n, low, high, generator, device):
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def random_resized_crop(x: torch.Tensor, scale, ratio, generator=None) -> torch.Tensor:
    """Crop a random area fraction in `scale` with aspect in `ratio`, resized back to
    the input size (bilinear), as one batched resampling."""
    b, device = x.shape[0], x.device
    area = _uniform(b, *scale, generator, device)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_r)
    # Width and height as fractions of the image side, clipped to fit.
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = _uniform(b, 0, 1, generator, device) * (1 - w) * 2 - (1 - w)
    cy = _uniform(b, 0, 1, generator, device) * (1 - h) * 2 - (1 - h)
    theta = torch.zeros(b, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x):
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, strength: float, generator=None) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1-s, 1+s]; hue rotated by up to
    s/2 of a turn in YIQ space (for RGB). Images are in [0, 1]."""
    b, device = x.shape[0], x.device
    shape = (b, 1, 1, 1)
    x = x * _uniform(b, 1 - strength, 1 + strength, generator, device).view(shape)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(b, 1 - strength, 1 + strength, generator, device).view(shape) + mean
    if x.shape[1] == 3:
        gray = _gray(x)
        x = (x - gray) * _uniform(b, 1 - strength, 1 + strength, generator, device).view(shape) + gray
        angle = _uniform(b, -strength / 2, strength / 2, generator, device) * 2 * math.pi
        cos, sin = torch.cos(angle), torch.sin(angle)
        to_yiq = torch.tensor(
            [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=device, dtype=x.dtype
        )
        rot = torch.zeros(b, 3, 3, device=device, dtype=x.dtype)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        matrix = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # (B, 3, 3)
        x = torch.einsum("bij,bjhw->bihw", matrix, x)
    return x.clamp(0, 1)


def augment(x: torch.Tensor, config: AugmentConfig | None = None, generator=None) -> torch.Tensor:
    """x: float images in [0, 1], (B, C, H, W). Returns the augmented batch, same shape."""
    config = config or AugmentConfig()
    b, device = x.shape[0], x.device
    x = random_resized_crop(x, (config.crop_min, 1.0), CROP_RATIO, generator)
    if config.jitter > 0:
        x = color_jitter(x, config.jitter, generator)
    if config.grayscale_p > 0 and x.shape[1] == 3:
        gray = torch.rand(b, generator=generator, device=device) < config.grayscale_p
        x = torch.where(gray.view(b, 1, 1, 1), _gray(x).expand_as(x), x)
    flip = torch.rand(b, generator=generator, device=device) < config.flip_p
    return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
