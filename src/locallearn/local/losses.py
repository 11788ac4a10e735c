"""Local losses shared by the methods (docs/methods.md, "Aux nets and local losses")."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def supcon_loss(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, base_temperature: float = 0.07
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) with one view, as InfoPro's ``--local_loss_mode contrast``.

    ``features`` (B, d) are L2-normalised here. Positives of row i are the other samples with label y_i; the
    anchor itself is excluded from numerator and denominator. A row without positives contributes 0 (its
    positive count is clamped to 1, as in InfoPro).
    """
    if features.dim() != 2:
        raise ValueError(f"supcon_loss expects (batch, dim) features, got shape {tuple(features.shape)}")
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & not_self
    exp = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp.sum(dim=1, keepdim=True))
    mean_log_prob_pos = (log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def reconstruction_loss(recon: torch.Tensor, image01: torch.Tensor) -> torch.Tensor:
    """BCE between the decoder's sigmoid output and the un-normalised image in [0, 1] (InfoPro's I(h; x) term).
    Always in fp32 outside autocast: CUDA's autocast refuses BCE on probabilities, and the decoder's sigmoid is
    fp32 too (:class:`~locallearn.local.aux_nets.Decoder`)."""
    if recon.shape != image01.shape:
        raise ValueError(f"decoder output {tuple(recon.shape)} does not match image {tuple(image01.shape)}")
    device = recon.device.type
    amp = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)  # never on meta tensors (estimates)
    with torch.autocast(device, enabled=False) if amp else contextlib.nullcontext():
        return F.binary_cross_entropy(recon.float(), image01.float())


def infopro_lambdas(
    k: int, num_modules: int, ixx_1: float, ixy_1: float, ixx_2: float, ixy_2: float, ratio: float | None = None
) -> tuple[float, float]:
    """(λ1, λ2) of local module k (0-based, k < K-1): linear from (ixx_1, ixy_1) to (ixx_2, ixy_2) (InfoPro).
    ``ratio`` replaces r = k/(K-2) (MAN's legacy stage-index ratio; may exceed 1 and extrapolate)."""
    if not 0 <= k < num_modules - 1:
        raise ValueError(f"module {k} has no local loss weights: only modules 0..{num_modules - 2} are local")
    r = ratio if ratio is not None else k / (num_modules - 2) if num_modules > 2 else 0.0
    return ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r
