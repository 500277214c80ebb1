"""3D-RPL, relative patch location (Taleb et al., NeurIPS 2020, after Doersch et al. 2015): a cube is cut
into a 3 x 3 x 3 grid of tiles (random gaps between them); from the centre tile and one of its 26
neighbours the encoder tells which neighbour it is. Encoder only; the network's input is one tile
(--patch-size), the sampler cuts cubes of 3 x (tile + gap)."""
from dataclasses import dataclass

import torch

from nnunet_sar.pretraining.objectives.base import (EncoderTask, classification_terms, GridSettings, Objective, TilesHead,
                                                    bottleneck_shape, cut_tiles, grid_cube_size)

CENTRE = 13  # of the 27 cells in raster order


@dataclass
class RPLSettings(GridSettings):
    pass


class CentreAndNeighbour:
    def __init__(self, tile, gap):
        self.tile, self.gap = tile, gap

    def __call__(self, **data):
        tiles = cut_tiles(data["image"], self.tile, self.gap)
        label = int(torch.randint(26, ()))
        data["image"] = torch.stack((tiles[CENTRE], tiles[label if label < CENTRE else label + 1]))
        data["location"] = torch.tensor(label, dtype=torch.int64)
        return data


class RPL(Objective):
    name = "rpl"
    trainer = "nnUNetTrainerRPL"  # its fine-tuning trainer (trainers/)
    description = "3D-RPL (Taleb et al. 2020): which of 26 neighbours of the centre tile, encoder only"
    transfers = "encoder"
    proxy_metric = "rpl_acc"
    chance = 1 / 26
    Settings = RPLSettings
    label_keys = ("location",)

    def cube_size(self):
        return grid_cube_size(self.input_size, self.options.gap)

    def transforms(self):
        return CentreAndNeighbour(self.input_size, self.options.gap)

    def build_network(self, unet):
        channels, spatial = bottleneck_shape(unet, self.input_size)
        return EncoderTask(unet, TilesHead(channels, spatial, 2, 26))

    def terms(self, network, batch: dict) -> dict:
        return classification_terms("rpl", network(batch["image"]), batch["location"])


OBJECTIVE = RPL
