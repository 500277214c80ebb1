"""The SAR objective (paper 2.4, Eq. 4) and the variants of the paper's ablations.

    min_{E,D,S} max_M   L_adv + alpha * L_scale + beta * L_res      (alpha = 1, beta = 10)

- L_res (Eq. 1): MSE between sigmoid(D(E(x_hat))) and the clean cube x (as Models Genesis); with
  ``--intensity nnunet`` the output is linear (z-scored targets are unbounded) and each cube's squared
  error is weighted by its map's scale^2, i.e. measured in the [0, 1] window's units, so that beta = 10
  keeps the paper's balance against L_scale and L_adv.
- L_scale (Eq. 2): cross-entropy of S(E(x_hat)) against the crop-scale label.
- L_adv (Eq. 3): cross-entropy of M's modality prediction. M minimises it; the encoder maximises it
  through the gradient reversal in ``SARNetwork`` (see ``nnunet_sar.heads``).
The learning-rate schedule follows ``alpha * L_scale + beta * L_res`` on held-out cubes: the part all
players minimise (the adversarial term is a game value with no reason to decrease).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Variant:
    name: str
    scale_loss: bool
    adversarial: bool
    scales: tuple  # indices into cubes.SCALES (0: 1/2, 1: 1/4, 2: 1/8)
    description: str

    def cubes_per_volume(self, counts) -> list:
        """``counts`` (L, M, S) drawn only at this variant's scales, as many in all: the left-out scales'
        cubes go to the kept ones in proportion (a single scale gets them all), so that every variant of
        Table 3 sees as many cubes and optimisation steps per epoch as ``sar``."""
        counts = [int(c) for c in counts]
        kept = [c if i in self.scales else 0 for i, c in enumerate(counts)]
        if not sum(kept):
            kept = [int(i in self.scales) for i in range(len(counts))]
        out = [sum(counts) * k // sum(kept) for k in kept]
        out[self.scales[-1]] += sum(counts) - sum(out)
        return out


VARIANTS = {v.name: v for v in (
    Variant("sar", True, True, (0, 1, 2), "full SAR: restoration + scale + adversarial"),
    Variant("genesis", False, False, (0, 1, 2), "restoration only (Models Genesis on the same cubes)"),
    Variant("sa", True, False, (0, 1, 2), "restoration + scale (Table 2, '+ SA')"),
    Variant("mial", False, True, (0, 1, 2), "restoration + adversarial (Table 2, '+ MIAL')"),
    # single crop scale (Table 3): the scale label is constant, so the scale term has nothing to learn
    Variant("scale2", False, True, (0,), "SAR on 1/2 crops only"),
    Variant("scale4", False, True, (1,), "SAR on 1/4 crops only"),
    Variant("scale8", False, True, (2,), "SAR on 1/8 crops only"),
)}


class SARObjective(torch.nn.Module):
    def __init__(self, alpha: float = 1.0, beta: float = 10.0, intensity: str = "unit"):
        super().__init__()
        self.alpha, self.beta, self.intensity = alpha, beta, intensity

    def restoration(self, restored: torch.Tensor) -> torch.Tensor:
        """The restored cube from the network's output (what the transfer check compares too)."""
        return torch.sigmoid(restored.float()) if self.intensity == "unit" else restored.float()

    def restoration_error(self, restored_cube, target, intensity=None) -> torch.Tensor:
        """L_res of restored cubes; with nnU-Net's intensities in the [0, 1] window's units (scale^2)."""
        err = (restored_cube.float() - target.float()) ** 2
        if self.intensity != "unit" and intensity is not None:
            err = err * intensity[:, 3].float().to(err.device).view(-1, *[1] * (err.ndim - 1)) ** 2
        return err.mean()

    def forward(self, restored, scale_logits, modality_logits, target, scale, modality, intensity=None) -> dict:
        """All terms, the total to back-propagate, the scheduled loss and the heads' accuracies."""
        out = {"res": self.restoration_error(self.restoration(restored), target, intensity)}
        total = self.beta * out["res"]
        if scale_logits is not None:
            out["scale"] = F.cross_entropy(scale_logits.float(), scale)
            out["scale_acc"] = (scale_logits.argmax(1) == scale).float().mean()
            total = total + self.alpha * out["scale"]
        out["scheduled"] = total.detach()
        if modality_logits is not None:
            out["adv"] = F.cross_entropy(modality_logits.float(), modality)
            out["adv_acc"] = (modality_logits.argmax(1) == modality).float().mean()
            total = total + out["adv"]
        out["total"] = total
        return out
