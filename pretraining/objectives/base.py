"""What a pre-training objective declares; the loop (``pretraining/loop.py``) knows nothing else of it.

An objective is one module of this package holding a subclass of ``Objective`` named ``OBJECTIVE``. It
declares
- ``Settings``: a dataclass of its own options (field metadata ``help``); the command line offers each as
  ``--<objective>-<option>`` and the run records them in ``settings.json`` (``objective_options``);
- ``build_network(unet)``: a module holding the U-Net as ``.unet`` and the heads it adds as other
  children; ``head_lr(name)`` gives each head's learning rate (the U-Net gets ``--lr-unet``);
- ``transforms()``: a batchgeneratorsv2-style callable ``(**item) -> item`` run on every cube (corruptions,
  masks, rotations, tiles), which may add label keys to the item; where it runs (data loader or device)
  is the loop's ``--transform-on`` setting, under the same per-cube seed on both paths;
- ``terms(network, batch)``: the loss terms of one batch: ``total`` (back-propagated), ``scheduled`` (the
  plateau schedule follows it) and any other terms and accuracies, which the loop logs and plots;
- ``transfers``: which parts of the U-Net it trains and therefore hands on: ``"all"`` (encoder and
  decoder) or ``"encoder"`` (the decoder stays at its initialisation; fine-tuning takes the encoder only);
- ``restores``: whether its output restores ``target`` (the transfer check then measures restoration MSE;
  otherwise the encoder's features and the proxy-task accuracy ``proxy_metric`` through nnU-Net's network).
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn


class Objective(abc.ABC):
    name: str = ""
    description: str = ""
    transfers: str = "all"        # "all": encoder and decoder; "encoder": the encoder only
    restores: bool = False        # the output is a restoration of batch["target"]
    proxy_metric: str | None = None  # the accuracy the transfer check compares (encoder objectives)
    chance: float | None = None   # that accuracy by chance
    Settings = None               # a dataclass of the objective's own options, or None
    label_keys: tuple = ()        # item keys the transforms add (labels)
    trainer: str = ""             # the nnUNetTrainer that fine-tunes from its checkpoint (trainers/)

    def __init__(self, settings, input_size: list):
        self.s = settings
        self.modalities: list = []
        self.batch_size = settings.batch_size
        self.input_size = [int(p) for p in input_size]
        options = dict(getattr(settings, "objective_options", None) or {})
        if self.Settings is None:
            if options:
                raise ValueError(f"objective {self.name!r} has no options, got {sorted(options)}")
            self.options = None
        else:
            known = {f.name for f in dataclasses.fields(self.Settings)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise ValueError(f"unknown options {unknown} for objective {self.name!r}; known: {sorted(known)}")
            self.options = self.Settings(**options)

    def setup(self, modalities: list, batch_size: int):
        """Called once the sources are known (before ``build_network``)."""
        self.modalities, self.batch_size = list(modalities), batch_size

    # ------------------------------------------------------------------ what the loop asks
    @property
    def run_name(self) -> str:
        """The run folder's name part: nnUNetSARPretrain_<run_name>__<plans>__<configuration>."""
        return self.name

    @property
    def scales(self) -> tuple:
        """Crop scales drawn (indices into cubes.SCALES)."""
        return (0, 1, 2)

    def cubes_per_volume(self, counts) -> list:
        return [int(c) for c in counts]

    def cube_size(self) -> list:
        """The size of the cubes the sampler cuts (default: the network's input)."""
        return list(self.input_size)

    def transforms(self):
        return None

    @abc.abstractmethod
    def build_network(self, unet: nn.Module) -> nn.Module:
        """A module holding ``unet`` as ``.unet`` and the objective's heads as its other children."""

    def head_lr(self, name: str) -> float:
        return self.options.lr_head

    @abc.abstractmethod
    def terms(self, network: nn.Module, batch: dict) -> dict:
        """The loss terms of one batch: ``total``, ``scheduled`` and any others (logged and plotted)."""

    def restoration(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The restored cube, in the target's intensity units, from the U-Net's output.

        ``--restoration-target standardised`` (default): the U-Net predicts the clean cube standardised by its
        own mean and standard deviation (as MAE's normalised pixel targets), read back as ``mean(target) +
        std(target) * output`` per cube and channel. The plans' instance norm makes the U-Net blind to each
        cube's intensity level and contrast, so predicting them is guessing; measured on the demo's phantoms,
        the absolute output stayed worse than each clean cube's mean after 300 steps, on uncorrupted cubes too
        (0.077 against 0.039). The error (``restoration_error``) is then std^2 times the standardised error: in
        the window's units, so beta keeps its balance. ``absolute``: Models Genesis' sigmoid in the [0, 1]
        window, linear under ``--intensity nnunet``, whose z-scored targets are unbounded."""
        if self.s.restoration_target == "standardised":
            flat = target.float().flatten(2)
            shape = (*flat.shape[:2], *[1] * (target.ndim - 2))
            return flat.mean(-1).view(shape) + flat.std(-1).view(shape) * output.float()
        return torch.sigmoid(output.float()) if self.s.intensity == "unit" else output.float()

    def restoration_error(self, restored, target, intensity=None, mask=None) -> torch.Tensor:
        """L_res: the squared error, averaged over all voxels or over ``mask``'s; under ``--intensity nnunet``
        weighted per cube by its map's scale^2, i.e. in the [0, 1] window's units, so that loss weights keep
        their balance whatever the intensities."""
        err = (restored.float() - target.float()) ** 2
        if self.s.intensity != "unit" and intensity is not None:
            err = err * intensity[:, 3].float().to(err.device).view(-1, *[1] * (err.ndim - 1)) ** 2
        if mask is None:
            return err.mean()
        mask = mask.float()
        return torch.sum(mask * err) / mask.sum().clamp_min(1)

    def record(self) -> dict:
        """What settings.json records of the objective besides its options."""
        return {}

    def check(self):
        """Raises ValueError when the run's settings cannot work for this objective."""


def options_of(objective_class) -> dict:
    """{option: (default, help)} of an objective's Settings."""
    if objective_class.Settings is None:
        return {}
    return {f.name: (f.default, f.metadata.get("help", "")) for f in dataclasses.fields(objective_class.Settings)}


class TilesHead(nn.Module):
    """A classifier on the bottlenecks of T cubes of one sample (T = 1 for a whole cube) that keeps where
    things are: a 1x1x1 convolution to ``width`` channels per cube, all flattened in order, then batch norm,
    FC + ReLU + FC. Global pooling would throw away the layout that rotation, location and order tasks are about
    (and after nnU-Net's instance norm, pooled channel means are nearly constant)."""

    def __init__(self, in_channels: int, spatial: tuple, n_tiles: int, n_out: int, width: int = 16, hidden: int = 256):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}.get(len(spatial), nn.Conv3d)
        self.reduce = conv(in_channels, width, 1)
        n = width * n_tiles
        for s in spatial:
            n *= int(s)
        # batch statistics (as SAR's M): the features before the encoder's norm have no set scale, and what
        # tells the samples of a batch apart must survive
        self.fc = nn.Sequential(nn.BatchNorm1d(n, track_running_stats=False), nn.Linear(n, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, n_out))

    def forward(self, z: torch.Tensor, b: int) -> torch.Tensor:
        return self.fc(self.reduce(z).reshape(b, -1))


def bottleneck_shape(unet: nn.Module, input_size) -> tuple[int, tuple]:
    """(channels, spatial shape) of the encoder's last stage for an input of ``input_size``."""
    shape = [int(s) for s in input_size]
    for st in unet.encoder.strides:
        st = [int(st)] * len(shape) if isinstance(st, int) else [int(x) for x in st]
        shape = [(s + t - 1) // t for s, t in zip(shape, st)]
    return int(unet.encoder.output_channels[-1]), tuple(shape)


class EncoderTask(nn.Module):
    """The U-Net (``.unet``; only its encoder runs, the decoder stays as initialised) and a head on the
    bottlenecks of a sample's cubes: ``forward(x)`` with x (B, T, C, *size) (T tiles per sample, or 1)
    encodes all B*T cubes and returns ``head(bottlenecks (B*T, C', *s), B)``.

    The head reads the bottleneck's last convolution *before* its norm (``model.PreNormFeatures``, as SAR's
    heads): nnU-Net's instance norm standardises each channel of each cube, and on a bottleneck of a few
    voxels that erases what tells a tile of air from one of tissue. Measured on phantoms (3D-RPL, 200 steps):
    held-out accuracy at chance after the norm."""

    def __init__(self, unet: nn.Module, head: nn.Module):
        super().__init__()
        from nnunet_sar.pretraining.model import PreNormFeatures
        self.unet = unet
        self.head = head
        self.features = PreNormFeatures(unet.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.unet.encoder(x.flatten(0, 1))
        return self.head(self.features.collect(skips)[-1], x.shape[0])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean()


def classification_terms(name: str, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Cross-entropy ``name`` (the total and the scheduled loss) and its accuracy ``<name>_acc``."""
    import torch.nn.functional as F
    loss = F.cross_entropy(logits.float(), labels)
    return {name: loss, f"{name}_acc": accuracy(logits, labels), "total": loss, "scheduled": loss.detach()}


def grid_cube_size(tile, gap: int, n: int = 3) -> list:
    """The cube cut for an n x n x n grid of ``tile``-sided cubes with up to ``gap`` voxels between them."""
    return [n * (int(t) + int(gap)) for t in tile]


def cut_tiles(image: torch.Tensor, tile, gap: int, n: int = 3) -> torch.Tensor:
    """(C, *cube) -> (n^3, C, *tile): the grid's cells in raster order (first axis slowest); each tile sits at
    a random offset in [0, gap] inside its cell (Taleb et al.'s jitter: neighbouring tiles share no edge to
    continue across)."""
    cells = [s // n for s in image.shape[1:]]
    offsets = torch.randint(0, int(gap) + 1, (n ** 3, len(cells))) if gap else torch.zeros(n ** 3, len(cells), dtype=torch.long)
    tiles = []
    for idx in range(n ** 3):
        pos = [(idx // n ** (len(cells) - 1 - a)) % n for a in range(len(cells))]
        sl = tuple(slice(p * c + int(o), p * c + int(o) + int(t)) for p, c, o, t in zip(pos, cells, offsets[idx], tile))
        tiles.append(image[(slice(None), *sl)])
    return torch.stack(tiles)


@dataclass
class GridSettings:
    lr_head: float = field(default=0.01, metadata={"help": "SGD learning rate of the head"})
    gap: int = field(default=4, metadata={"help": "largest gap in voxels between neighbouring tiles (random jitter)"})
