"""PSNR and SSIM as super-resolution papers report them (EDSR; docs/glcan.md, "Task and metrics").

The convention: both images quantised to 8 bits, converted to the luma channel Y of ITU-R BT.601 as MATLAB's
``rgb2ycbcr`` does (Y in [16, 235]), a border of ``shave`` pixels (= the scale factor) cropped, then
PSNR = 10·log10(255² / MSE) and the Gaussian SSIM of Wang et al. (2004): 11×11 window, σ = 1.5, K1 = 0.01,
K2 = 0.03, population covariances, averaged over the positions where the window fits. Each value is per image;
a test set reports their mean.

Implemented in torch (batched, on the device, no host copy); ``tests/test_sr.py`` checks both against
scikit-image's ``peak_signal_noise_ratio`` and ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`` on ``rgb2ycbcr(...)[..., 0]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# MATLAB rgb2ycbcr, first row: Y = 16 + 65.481 R + 128.553 G + 24.966 B for RGB in [0, 1].
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_SSIM_SIGMA, _SSIM_RADIUS = 1.5, 5  # scipy's gaussian_filter radius for truncate=3.5: int(3.5 * 1.5 + 0.5)


def quantize(image01: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid as a saved image would be (values stay in [0, 1])."""
    return image01.clamp(0, 1).mul(255).round().div(255)


def luma(image01: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] → (B, H, W) Y in [16, 235], float64. A one-channel image is taken as Y already
    scaled to [0, 1] (mapped to the same range)."""
    x = image01.double()
    if x.shape[1] == 1:
        return 16 + 219 * x[:, 0]
    if x.shape[1] != 3:
        raise ValueError(f"PSNR/SSIM on Y need RGB or one-channel images, got {x.shape[1]} channels")
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device)
    return 16 + torch.einsum("bchw,c->bhw", x, w)


def _prepare(sr01: torch.Tensor, hr01: torch.Tensor, shave: int) -> tuple[torch.Tensor, torch.Tensor]:
    if sr01.shape != hr01.shape:
        raise ValueError(f"SR output {tuple(sr01.shape)} and HR target {tuple(hr01.shape)} differ in shape")
    ys, yh = luma(quantize(sr01)), luma(quantize(hr01))
    if shave:
        if min(ys.shape[-2:]) <= 2 * shave:
            raise ValueError(f"image {tuple(ys.shape[-2:])} too small for a border crop of {shave} px")
        ys, yh = ys[:, shave:-shave, shave:-shave], yh[:, shave:-shave, shave:-shave]
    return ys, yh


def psnr_y(sr01: torch.Tensor, hr01: torch.Tensor, shave: int = 0) -> torch.Tensor:
    """Per-image PSNR (dB) on Y with a ``shave``-pixel border crop; (B,) float64. Identical images give +inf,
    as scikit-image does."""
    ys, yh = _prepare(sr01, hr01, shave)
    mse = (ys - yh).pow(2).mean(dim=(-2, -1))
    return 10 * torch.log10(255.0**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian, 'valid' positions only (= scikit-image's filtered map with its border cropped)."""
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def ssim_y(sr01: torch.Tensor, hr01: torch.Tensor, shave: int = 0) -> torch.Tensor:
    """Per-image Gaussian SSIM on Y with a ``shave``-pixel border crop; (B,) float64."""
    ys, yh = _prepare(sr01, hr01, shave)
    if min(ys.shape[-2:]) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs at least 11×11 pixels after the border crop, got {tuple(ys.shape[-2:])}")
    g = _gaussian_window(ys.device)
    a, b = ys.unsqueeze(1), yh.unsqueeze(1)
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    var_a = _filter(a * a, g) - mu_a**2
    var_b = _filter(b * b, g) - mu_b**2
    cov = _filter(a * b, g) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))
