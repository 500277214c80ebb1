"""3D-Jigsaw (Taleb et al., NeurIPS 2020, after Noroozi & Favaro 2016): the 27 tiles of a 3 x 3 x 3 grid
(random gaps between them) are shuffled by one permutation of a fixed set, and the encoder (shared by all
tiles, their features concatenated in the shuffled order) tells which. The set is chosen greedily for
maximal Hamming distance (each next permutation is the one of a seeded candidate pool farthest, in its
minimal distance, from those chosen), as Noroozi & Favaro's; it depends only on its size and seed.
Encoder only; the network's input is one tile (--patch-size)."""
from dataclasses import dataclass, field

import numpy as np
import torch

from nnunet_sar.pretraining.objectives.base import (EncoderTask, classification_terms, GridSettings, Objective, TilesHead,
                                                    bottleneck_shape, cut_tiles, grid_cube_size)


@dataclass
class JigsawSettings(GridSettings):
    permutations: int = field(default=100, metadata={"help": "size of the permutation set (the classes)"})
    permutation_seed: int = field(default=0, metadata={"help": "seed of the permutation set"})


def max_hamming_permutations(count: int, n: int = 27, seed: int = 0, pool: int | None = None) -> np.ndarray:
    """``count`` permutations of ``n`` with large pairwise Hamming distances, greedily from a seeded pool."""
    rng = np.random.default_rng(seed)
    pool = pool or max(5000, 50 * count)
    candidates = np.stack([rng.permutation(n) for _ in range(pool)])
    chosen = [0]
    nearest = (candidates != candidates[0]).sum(1)
    for _ in range(count - 1):
        best = int(nearest.argmax())
        chosen.append(best)
        nearest = np.minimum(nearest, (candidates != candidates[best]).sum(1))
    return candidates[chosen]


class ShuffleTiles:
    def __init__(self, tile, gap, permutations: np.ndarray):
        self.tile, self.gap, self.permutations = tile, gap, torch.as_tensor(permutations)

    def __call__(self, **data):
        tiles = cut_tiles(data["image"], self.tile, self.gap)
        label = int(torch.randint(len(self.permutations), ()))
        data["image"] = tiles[self.permutations[label].to(tiles.device)]
        data["permutation"] = torch.tensor(label, dtype=torch.int64)
        return data


class Jigsaw(Objective):
    name = "jigsaw"
    trainer = "nnUNetTrainerJigsaw"  # its fine-tuning trainer (trainers/)
    description = "3D-Jigsaw (Taleb et al. 2020): which of a max-Hamming set of permutations of 27 tiles, encoder only"
    transfers = "encoder"
    proxy_metric = "jigsaw_acc"
    Settings = JigsawSettings
    label_keys = ("permutation",)

    def __init__(self, settings, input_size):
        super().__init__(settings, input_size)
        self.permutations = max_hamming_permutations(self.options.permutations, 27, self.options.permutation_seed)
        self.chance = 1 / self.options.permutations

    def check(self):
        if self.options.permutations < 2:
            raise ValueError("--jigsaw-permutations: at least 2")

    def cube_size(self):
        return grid_cube_size(self.input_size, self.options.gap)

    def transforms(self):
        return ShuffleTiles(self.input_size, self.options.gap, self.permutations)

    def build_network(self, unet):
        channels, spatial = bottleneck_shape(unet, self.input_size)
        return EncoderTask(unet, TilesHead(channels, spatial, 27, len(self.permutations)))

    def terms(self, network, batch: dict) -> dict:
        return classification_terms("jigsaw", network(batch["image"]), batch["permutation"])

    def record(self) -> dict:
        d = (self.permutations[:, None] != self.permutations[None]).sum(-1)
        return {"jigsaw_min_hamming_distance": int(d[~np.eye(len(d), dtype=bool)].min())}


OBJECTIVE = Jigsaw
