"""Masked restoration (MAE for CNNs): blocks of the cube are blanked at random, the U-Net restores them,
and the loss reads the masked voxels only; encoder and decoder are trained and handed on.

Choices and sources:
- block size 16 voxels per side and mask ratio 0.75: the defaults of nnssl's ``BaseMAETrainer``
  (``mask_creation(block_size=16)``, ``mask_percentage = 0.75``), the MAE recipe of Wald et al., "Revisiting
  MAE pre-training for 3D medical image segmentation" (CVPR 2025), who report ratios of about 60-75 % with
  16^3 blocks working best for nnU-Net's CNNs. Their ResEnc-L sees 160^3 patches (10^3 blocks); for the
  small cubes of the tests and the demo (16^3-32^3) choose smaller blocks (``--mae-block-size 4``).
- masked voxels are set to 0 (nnssl multiplies the input by the mask; no sparse convolutions or mask
  token here: the network is nnU-Net's own, unchanged).
- the loss is the MSE of sigmoid(output) against the clean cube on the masked voxels (intensities in [0, 1],
  as Models Genesis' restoration in this package; linear output under ``--intensity nnunet``, where the
  masked zeros are mapped with the rest of the cube).
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from nnunet_sar.pretraining.objectives.base import Objective


@dataclass
class MAESettings:
    mask_ratio: float = field(default=0.75, metadata={"help": "share of the blocks masked (Wald et al. 2025, nnssl)"})
    block_size: int = field(default=16, metadata={"help": "side of a masked block in voxels (nnssl: 16)"})


class BlockMask:
    """batchgeneratorsv2-style: blanks ``ratio`` of the ``block``-sided blocks of the image (a grid over the
    cube; the last block of an axis may be cut short) and adds ``loss_mask`` (1 on masked voxels)."""

    def __init__(self, ratio: float, block: int):
        self.ratio, self.block = float(ratio), int(block)

    def __call__(self, **data):
        image = data["image"]
        spatial = image.shape[1:]
        grid = [-(-int(s) // self.block) for s in spatial]
        n = 1
        for g in grid:
            n *= g
        k = min(n, max(1, int(round(self.ratio * n))))
        small = torch.zeros(n, device=image.device)
        small[torch.randperm(n)[:k].to(image.device)] = 1
        mask = small.view(1, *grid)
        for axis, s in enumerate(spatial):
            mask = mask.repeat_interleave(self.block, dim=axis + 1).narrow(axis + 1, 0, int(s))
        data["image"] = image * (1 - mask)
        data["loss_mask"] = mask.to(image.dtype)
        return data


class Restorer(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x):
        return self.unet(x)


class MAE(Objective):
    name = "mae"
    trainer = "nnUNetTrainerMAE"  # its fine-tuning trainer (trainers/)
    description = "masked restoration (Wald et al., CVPR 2025): restore blanked 16^3 blocks (3 in 4), encoder + decoder"
    transfers = "all"
    restores = True
    Settings = MAESettings
    label_keys = ("loss_mask",)

    def check(self):
        if not 0 < self.options.mask_ratio < 1:
            raise ValueError(f"--mae-mask-ratio {self.options.mask_ratio}: must lie in (0, 1)")
        if self.options.block_size < 1 or self.options.block_size > min(self.input_size):
            raise ValueError(f"--mae-block-size {self.options.block_size}: at least 1 and at most the cube's smallest "
                             f"side {min(self.input_size)}")

    def transforms(self):
        return BlockMask(self.options.mask_ratio, self.options.block_size)

    def build_network(self, unet):
        return Restorer(unet)

    def terms(self, network, batch: dict) -> dict:
        res = self.restoration_error(self.restoration(network(batch["image"]), batch["target"]), batch["target"],
                                     batch.get("intensity"), mask=batch["loss_mask"])
        return {"res": res, "total": res, "scheduled": res.detach()}


OBJECTIVE = MAE
