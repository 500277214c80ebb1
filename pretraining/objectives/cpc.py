"""3D-CPC, contrastive predictive coding (Taleb et al., NeurIPS 2020, after van den Oord et al. 2018 and
Henaff et al. 2020): a cube is cut into a 3 x 3 x 3 grid of tiles, each encoded by the U-Net's encoder
(shared) into a vector; a context network reads the first slab of 9 tiles and predicts the vectors of the
18 tiles below it. InfoNCE: each prediction must pick its own tile's vector among those of all tiles of
the batch (cosine similarity / temperature). Encoder only; the network's input is one tile."""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sar.pretraining.objectives.base import (EncoderTask, GridSettings, Objective, bottleneck_shape, cut_tiles,
                                                    grid_cube_size)

CONTEXT, PREDICTED = 9, 18  # tiles of the first slab (context) and of the other two (predicted)


@dataclass
class CPCSettings(GridSettings):
    gap: int = field(default=0, metadata={"help": "largest gap in voxels between neighbouring tiles"})
    dim: int = field(default=64, metadata={"help": "size of a tile's code"})
    temperature: float = field(default=0.1, metadata={"help": "InfoNCE temperature"})


class AllTiles:
    def __init__(self, tile, gap):
        self.tile, self.gap = tile, gap

    def __call__(self, **data):
        data["image"] = cut_tiles(data["image"], self.tile, self.gap)
        return data


class CPCHead(nn.Module):
    """Codes per tile (1x1x1 conv, flatten, FC), context of the first slab (MLP) and the predictions."""

    def __init__(self, channels: int, spatial: tuple, dim: int, width: int = 16, hidden: int = 256):
        super().__init__()
        n = width
        for s in spatial:
            n *= int(s)
        self.code = nn.Sequential(nn.Conv3d(channels, width, 1), nn.Flatten(1),
                                  nn.BatchNorm1d(n, track_running_stats=False), nn.Linear(n, dim))
        self.context = nn.Sequential(nn.Linear(CONTEXT * dim, hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, PREDICTED * dim))
        self.dim = dim

    def forward(self, z: torch.Tensor, b: int):
        codes = self.code(z).view(b, CONTEXT + PREDICTED, self.dim)
        predictions = self.context(codes[:, :CONTEXT].flatten(1)).view(b, PREDICTED, self.dim)
        return codes, predictions


class CPC(Objective):
    name = "cpc"
    trainer = "nnUNetTrainerCPC"  # its fine-tuning trainer (trainers/)
    description = "3D-CPC (Taleb et al. 2020): InfoNCE, the first slab of a 3x3x3 tile grid predicts the rest, encoder only"
    transfers = "encoder"
    proxy_metric = "cpc_acc"
    Settings = CPCSettings

    def setup(self, modalities, batch_size):
        super().setup(modalities, batch_size)
        self.chance = 1 / (batch_size * (CONTEXT + PREDICTED))  # one right code among all of a batch's tiles

    def cube_size(self):
        return grid_cube_size(self.input_size, self.options.gap)

    def transforms(self):
        return AllTiles(self.input_size, self.options.gap)

    def build_network(self, unet):
        channels, spatial = bottleneck_shape(unet, self.input_size)
        return EncoderTask(unet, CPCHead(channels, spatial, self.options.dim))

    def terms(self, network, batch: dict) -> dict:
        codes, predictions = network(batch["image"])
        b, n = codes.shape[:2]
        keys = F.normalize(codes.float().flatten(0, 1), dim=1)          # (B * 27, dim)
        queries = F.normalize(predictions.float().flatten(0, 1), dim=1)  # (B * 18, dim)
        logits = queries @ keys.T / self.options.temperature
        target = (torch.arange(b, device=codes.device)[:, None] * n + CONTEXT
                  + torch.arange(PREDICTED, device=codes.device)[None]).flatten()
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(1) == target).float().mean()
        return {"cpc": loss, "cpc_acc": acc, "total": loss, "scheduled": loss.detach()}


OBJECTIVE = CPC
