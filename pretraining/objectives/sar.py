"""The SAR objective (paper 2.4, Eq. 4) and the variants of the paper's ablations (Tables 2 and 3).

    min_{E,D,S} max_M   L_adv + alpha * L_scale + beta * L_res      (alpha = 1, beta = 10)

- L_res (Eq. 1): MSE between the restoration D(E(x_hat)) and the clean cube x, x_hat = the cube with Models
  Genesis' corruptions (``corruptions.py``). By default (``--restoration-target standardised``) the output
  restores x standardised by its own mean and std and is read back with them (``Objective.restoration``: the
  plans' instance norm hides each cube's level and contrast from the U-Net); ``absolute`` is Models Genesis'
  sigmoid of the output against x. Errors are measured in the [0, 1] window's units whatever the intensity
  scheme (``Objective.restoration_error``), so that beta = 10 keeps the paper's balance.
- L_scale (Eq. 2): cross-entropy of S(E(x_hat)) against the crop-scale label.
- L_adv (Eq. 3): cross-entropy of M's modality prediction. M minimises it; the encoder maximises it
  through the gradient reversal in ``SARNetwork`` (see ``nnunet_sar.heads``).
The learning-rate schedule follows ``alpha * L_scale + beta * L_res`` on held-out cubes: the part all
players minimise (the adversarial term is a game value with no reason to decrease). Its settings
(alpha, beta, adv_weight, lr_scale, lr_disc, the corruption rates) are the loop's, as before the
objectives became plug-ins.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from nnunet_sar.pretraining.objectives.base import Objective


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


def sar_terms(res, scale_logits, modality_logits, scale, modality, alpha: float, beta: float) -> dict:
    """All terms of Eq. 4 from L_res, the total to back-propagate, the scheduled loss and the heads' accuracies."""
    out = {"res": res}
    total = beta * out["res"]
    if scale_logits is not None:
        out["scale"] = F.cross_entropy(scale_logits.float(), scale)
        out["scale_acc"] = (scale_logits.argmax(1) == scale).float().mean()
        total = total + alpha * out["scale"]
    out["scheduled"] = total.detach()
    if modality_logits is not None:
        out["adv"] = F.cross_entropy(modality_logits.float(), modality)
        out["adv_acc"] = (modality_logits.argmax(1) == modality).float().mean()
        total = total + out["adv"]
    out["total"] = total
    return out


class SAR(Objective):
    name = "sar"
    trainer = "nnUNetTrainerSAR"  # its fine-tuning trainer (trainers/)
    description = "SAR: restoration + crop scale + modality-adversarial (paper 2.4); --variant picks an ablation"
    transfers = "all"
    restores = True
    fixed_variant = None  # genesis.py: always the 'genesis' variant

    def __init__(self, settings, input_size):
        super().__init__(settings, input_size)
        name = self.fixed_variant or settings.variant or "sar"
        if self.fixed_variant and settings.variant not in (None, self.fixed_variant, "sar"):
            raise ValueError(f"--objective {self.name} has no variant {settings.variant!r}")
        if name not in VARIANTS:
            raise ValueError(f"unknown --variant {name!r}; choose from {', '.join(VARIANTS)}")
        self.variant = VARIANTS[name]
        self.alpha, self.beta = settings.alpha, settings.beta
        self.adversarial = self.variant.adversarial

    def setup(self, modalities, batch_size):
        import warnings
        super().setup(modalities, batch_size)
        self.adversarial = self.variant.adversarial
        if batch_size < 8 and self.adversarial:
            warnings.warn(f"batch size {batch_size}: M normalises its features over the batch, and so few cubes "
                          f"per batch hide modality differences; consider --preset paper (the paper's 32 64 64 cube, "
                          f"batch 32) or --batch-size 8 or more")
        if self.adversarial and len(self.modalities) < 2:
            warnings.warn(f"all sources are {self.modalities[0]}: the adversarial term has nothing to separate and is "
                          f"left out of this run")
            self.adversarial = False

    @property
    def run_name(self) -> str:
        return self.variant.name

    @property
    def description_of_run(self) -> str:
        return f"SAR pre-training '{self.variant.name}' ({self.variant.description})"

    @property
    def scales(self) -> tuple:
        return self.variant.scales

    def cubes_per_volume(self, counts) -> list:
        return self.variant.cubes_per_volume(counts)

    def transforms(self):
        from nnunet_sar.pretraining.corruptions import genesis_corruptions
        return genesis_corruptions(**self.s.corruptions)

    def build_network(self, unet):
        from nnunet_sar.pretraining.model import SARNetwork
        return SARNetwork(unet, num_scales=3, num_modalities=len(self.modalities), scale_head=self.variant.scale_loss,
                          discriminator=self.adversarial)

    def head_lr(self, name: str) -> float:
        return {"scale_head": self.s.lr_scale, "discriminator": self.s.lr_disc}[name]

    def terms(self, network, batch: dict) -> dict:
        restored, scale_logits, modality_logits = network(batch["image"], self.s.adv_weight)
        res = self.restoration_error(self.restoration(restored, batch["target"]), batch["target"], batch.get("intensity"))
        return sar_terms(res, scale_logits, modality_logits, batch["scale"], batch["modality"], self.alpha, self.beta)

    def record(self) -> dict:
        return {"adversarial": self.adversarial, "scale_loss": self.variant.scale_loss, "scales": list(self.scales)}


OBJECTIVE = SAR
