"""3D-Rot (Taleb et al., "3D Self-Supervised Methods for Medical Imaging", NeurIPS 2020): the encoder
tells which of 10 rotations turned the cube: none, or 90, 180, 270 degrees about one of the three axes.
Only the encoder is trained (a classifier head on its bottleneck); fine-tuning takes the encoder and
leaves the decoder at nnU-Net's initialisation, as the SAR paper's Table 2 does for these baselines.
Rotations about an axis need the cube square in the other two: use a cubic --patch-size."""
from dataclasses import dataclass, field

import torch

from nnunet_sar.pretraining.objectives.base import EncoderTask, Objective, TilesHead, bottleneck_shape, classification_terms

# class -> (k quarter turns, plane); class 0 = unrotated; 1-9: 90/180/270 degrees in the planes of the 3 axes
ROTATIONS = [(0, (1, 2))] + [(k, plane) for plane in ((2, 3), (1, 3), (1, 2)) for k in (1, 2, 3)]


@dataclass
class RotSettings:
    lr_head: float = field(default=0.01, metadata={"help": "SGD learning rate of the rotation classifier"})


class RandomRotation:
    """batchgeneratorsv2-style: rotates the image by one of ``ROTATIONS`` (uniform), label ``rotation``."""

    def __call__(self, **data):
        c = int(torch.randint(len(ROTATIONS), ()))
        k, plane = ROTATIONS[c]
        data["image"] = torch.rot90(data["image"], k, plane) if k else data["image"]
        data["rotation"] = torch.tensor(c, dtype=torch.int64)
        return data


class Rot(Objective):
    name = "rot"
    trainer = "nnUNetTrainerRot"  # its fine-tuning trainer (trainers/)
    description = "3D-Rot (Taleb et al. 2020): which of 10 rotations, encoder only"
    transfers = "encoder"
    proxy_metric = "rot_acc"
    chance = 1 / len(ROTATIONS)
    Settings = RotSettings
    label_keys = ("rotation",)

    def check(self):
        if len(set(self.input_size)) != 1:
            raise ValueError(f"rotations by 90 degrees need a cube; --patch-size is {self.input_size} (give 3 equal "
                             f"sides)")

    def transforms(self):
        return RandomRotation()

    def build_network(self, unet):
        channels, spatial = bottleneck_shape(unet, self.input_size)
        return EncoderTask(unet, TilesHead(channels, spatial, 1, len(ROTATIONS)))

    def terms(self, network, batch: dict) -> dict:
        return classification_terms("rot", network(batch["image"][:, None]), batch["rotation"])


OBJECTIVE = Rot
