"""The multi-scale cube generator of the Scale-Aware module (SAR paper, section 2.2).

For each preprocessed volume (see ``sources.py``) sub-volumes of three scales are cropped at random
positions: large, medium and small, about 1/2, 1/4 and 1/8 of the volume's side (per axis), in the ratio
1 : 1 : 2 (Table 1). Every crop is resized (trilinear) to the network's input patch (the paper's
64 x 64 x 32 in (x, y, z), i.e. 32 x 64 x 64 in nnU-Net's (z, y, x) array order); its label for the scale
head is the scale index (0 = large, 1 = medium, 2 = small), and its modality index feeds the adversarial
(MIAL) discriminator.

Determinism: an epoch's plan (which volume and scale each index ``i`` is) is a seeded shuffle of
(seed, epoch); the crop position of index ``i`` comes from ``np.random.default_rng((seed, epoch, i))`` and
the optional transforms run under torch / numpy / python RNGs seeded from (seed, epoch, i). A cube thus
depends only on (seed, epoch, i): the same with any number of DataLoader workers, ranks, or after resume.
"""
from __future__ import annotations

import math
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .intensity import IDENTITY
from .sources import Volume

__all__ = [
    "SCALES",
    "SCALE_NAMES",
    "DEFAULT_CUBES_PER_VOLUME",
    "crop_size",
    "resize_trilinear",
    "check_patch_size",
    "MultiScaleCubes",
    "fixed_validation_cubes",
    "seeded_transform",
    "transform_batch",
]

SCALES = (1 / 2, 1 / 4, 1 / 8)  # label 0 = large, 1 = medium, 2 = small
SCALE_NAMES = ("large", "medium", "small")
DEFAULT_CUBES_PER_VOLUME = (16, 16, 32)  # Table 1's LUNA16 and BraTS volumes (LiTS and Heart: twice as many)


def crop_size(volume_shape, fraction, min_size=4) -> tuple[int, int, int]:
    """Per axis ``max(min_size, round(fraction * side))`` (Python's round)."""
    return tuple(max(int(min_size), int(round(fraction * int(s)))) for s in volume_shape)


def check_patch_size(patch_size, network_strides) -> None:
    """Raise ValueError when a side of ``patch_size`` is not divisible by the network's total stride on it.

    ``network_strides``: one entry per stage, each an int or a per-axis list (as in nnU-Net plans'
    ``arch_kwargs['strides']``); the total stride of an axis is the product over stages.
    """
    patch = [int(p) for p in patch_size]
    total = [1] * len(patch)
    for st in network_strides:
        st = [int(st)] * len(patch) if np.isscalar(st) else [int(x) for x in st]
        if len(st) != len(patch):
            raise ValueError(f"stride {st} has {len(st)} axes but patch size {tuple(patch)} has {len(patch)}")
        total = [t * s for t, s in zip(total, st)]
    bad = [a for a, (p, t) in enumerate(zip(patch, total)) if p <= 0 or p % t]
    if bad:
        raise ValueError(
            f"patch size {tuple(patch)} is not divisible by the network's total stride per axis {tuple(total)} "
            f"(axes {bad}); choose sides that are multiples of {tuple(total)}"
        )


def resize_trilinear(t: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(t[None, None], size, mode="trilinear", align_corners=False)[0, 0]`` of a 3-D tensor,
    computed, when a small crop is enlarged (the 1/4 and 1/8 crops), as a linear pass over the first
    axis on the crop and then a bilinear pass over the last two (trilinear interpolation is separable;
    the results agree to float rounding). About twice as fast on one CPU core for 128^3 cubes: most
    outputs come from a 4-tap pass instead of an 8-tap one."""
    size = tuple(int(s) for s in size)
    if tuple(t.shape) == size:
        return t
    if 4 * t.numel() > math.prod(size):  # little or no enlargement: one 8-tap pass over the outputs is cheaper
        return F.interpolate(t[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    lo, hi = (float(v) for v in t.aminmax())  # of the small crop: cheap
    x, y, z = t.shape
    if x != size[0]:
        rows = t.reshape(x, -1).T[:, None]  # (Y * Z, 1, X)
        t = F.interpolate(rows, size=size[0], mode="linear", align_corners=False)[:, 0].T.contiguous().view(size[0], y, z)
    if (y, z) != size[1:]:
        t = F.interpolate(t[None], size=size[1:], mode="bilinear", align_corners=False)[0]
    # interpolation stays within its inputs' range, but two rounded passes can leave it by ~1e-7
    return t.clamp_(lo, hi).contiguous()  # (bilinear may hand back a channels-last layout for 1 x 1 planes)


def _derived_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint32)[0])


class MultiScaleCubes(Dataset):
    """Dataset of multi-scale cubes; an epoch is the sum of ``cubes_per_volume`` over the volumes: one
    count per scale for all volumes, or one row of counts per volume (per-source counts, Table 1).

    Items: ``{"image": float32 (1, *patch_size), "target": float32 (1, *patch_size),
    "scale": int64 0-d tensor, "modality": int64 0-d tensor, "intensity": float32 (5,)}``, the last the
    volume's map to nnU-Net's normalisation (``intensity.py``, applied after the corruptions). Without
    ``transforms`` image == target
    (corrupt later, e.g. batched on the GPU); with ``transforms`` (batchgeneratorsv2 style:
    ``transforms(image=..., regression_target=...) -> dict``) image is what it returns as ``image`` and
    target what it returns as ``regression_target`` (the clean cube, flipped along with the image).

    Call ``set_epoch(e)`` before each epoch (in the main process, before the DataLoader's workers start,
    i.e. ``persistent_workers=False``), or index with ``(epoch, i)`` tuples, which works everywhere.
    Memory-mapped volume files are opened lazily per process and kept open.
    """

    def __init__(self, volumes: list[Volume], patch_size, scales=SCALES, cubes_per_volume=DEFAULT_CUBES_PER_VOLUME,
                 modalities: list[str] | None = None, transforms=None, seed: int = 0, intensity_maps=None):
        self.volumes = list(volumes)
        if not self.volumes:
            raise ValueError("MultiScaleCubes needs at least one volume")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
        self.scales = tuple(float(s) for s in scales)
        counts = np.asarray(cubes_per_volume, dtype=np.int64)
        if counts.ndim == 1:  # one count per scale for every volume
            counts = np.tile(counts, (len(self.volumes), 1))
        if counts.shape != (len(self.volumes), len(self.scales)):
            raise ValueError(f"{len(self.scales)} scales {self.scales} and {len(self.volumes)} volumes but "
                             f"cubes_per_volume has shape {counts.shape}: {cubes_per_volume}")
        if counts.min() < 0 or counts.sum() == 0:
            raise ValueError(f"cubes_per_volume must be non-negative with a positive sum, got {cubes_per_volume}")
        self.counts = counts  # (volume, scale): each source may carry its own counts (Table 1)
        if any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must be in (0, 1], got {self.scales}")
        self.modalities = list(modalities) if modalities is not None else sorted({v.modality for v in self.volumes})
        missing = sorted({v.modality for v in self.volumes} - set(self.modalities))
        if missing:
            raise ValueError(f"volume modalities {missing} are not in modalities {self.modalities}")
        self._modality_index = [self.modalities.index(v.modality) for v in self.volumes]
        maps = intensity_maps if intensity_maps is not None else [IDENTITY] * len(self.volumes)
        if len(maps) != len(self.volumes):
            raise ValueError(f"{len(maps)} intensity maps for {len(self.volumes)} volumes")
        self._intensity = torch.tensor(maps, dtype=torch.float32)
        self.transforms = transforms
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self._crop_sizes = [[crop_size(v.shape, s) for s in self.scales] for v in self.volumes]
        self._arrays: dict[int, np.ndarray] = {}
        self._warned: set[int] = set()
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.epoch = 0
        self.set_epoch(0)

    # ------------------------------------------------------------------ plan
    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        plan = self._plans.get(epoch)
        if plan is None:
            vol = np.repeat(np.arange(len(self.volumes)), self.counts.sum(1))
            scale = np.concatenate([np.repeat(np.arange(len(self.scales)), c) for c in self.counts])
            perm = np.random.default_rng((self.seed, int(epoch))).permutation(len(vol))
            plan = (vol[perm], scale[perm])
            if len(self._plans) >= 4:
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = plan
        return plan

    def set_epoch(self, epoch: int) -> None:
        """Select the deterministic, seeded plan of ``epoch`` (>= 0)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self._plan(self.epoch)

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(volume index, scale index) arrays of an epoch's plan (default: the current epoch)."""
        return self._plan(self.epoch if epoch is None else int(epoch))

    def __len__(self) -> int:
        return int(self.counts.sum())

    # ------------------------------------------------------------------ data
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}  # memmaps are reopened in the receiving process
        return state

    def _array(self, v: int) -> np.ndarray:
        a = self._arrays.get(v)
        if a is None:
            a = np.load(self.volumes[v].path, mmap_mode="r")
            if a.ndim != 3 or tuple(a.shape) != tuple(self.volumes[v].shape):
                raise ValueError(f"{self.volumes[v].path}: array shape {a.shape} differs from the volume's "
                                 f"recorded shape {tuple(self.volumes[v].shape)}; re-run preprocessing")
            self._arrays[v] = a
        return a

    def _crop(self, v: int, s: int, rng: np.random.Generator) -> torch.Tensor:
        arr = self._array(v)
        crop = self._crop_sizes[v][s]
        src, dst, pad = [], [], False
        for side, c in zip(arr.shape, crop):
            if side >= c:
                a = int(rng.integers(0, side - c + 1))
                src.append(slice(a, a + c))
                dst.append(slice(0, c))
            else:  # smaller than the crop: whole axis at a random offset, zeros around it
                o = int(rng.integers(0, c - side + 1))
                src.append(slice(0, side))
                dst.append(slice(o, o + side))
                pad = True
        if pad:
            if v not in self._warned:
                self._warned.add(v)
                warnings.warn(f"volume {self.volumes[v].path} {tuple(arr.shape)} is smaller than its "
                              f"{SCALE_NAMES[s] if s < len(SCALE_NAMES) else s} crop {crop}: padded with zeros",
                              stacklevel=3)
            x = np.zeros(crop, dtype=arr.dtype)
            x[tuple(dst)] = arr[tuple(src)]
        else:
            x = np.array(arr[tuple(src)], order="C")  # reads only the crop from the memmap
        t = torch.from_numpy(x).float()  # float16 -> float32 in torch (vectorised, much faster than numpy)
        return resize_trilinear(t, self.patch_size)[None]

    def transform_seed(self, key) -> int:
        """The seed the transforms of cube ``key`` = (epoch, i) run under, on either path (loader or device)."""
        return _derived_seed(self.seed, int(key[0]), int(key[1]), 1)

    def __getitem__(self, i) -> dict:
        if isinstance(i, tuple):
            epoch, i = int(i[0]), int(i[1])
            if epoch < 0:
                raise IndexError(f"epoch {epoch} < 0")
        else:
            epoch, i = self.epoch, int(i)
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} cubes")
        vols, scales = self._plan(epoch)
        v, s = int(vols[i]), int(scales[i])
        rng = np.random.default_rng((self.seed, epoch, i))
        cube = self._crop(v, s, rng)
        item = {"image": cube, "target": cube.clone(), "scale": torch.tensor(s, dtype=torch.int64),
                "modality": torch.tensor(self._modality_index[v], dtype=torch.int64),
                "intensity": self._intensity[v].clone()}
        if self.transforms is not None:
            item = seeded_transform(self.transforms, item, self.transform_seed((epoch, i)))
        return item


def seeded_transform(transforms, item: dict, seed: int) -> dict:
    """``transforms`` (batchgeneratorsv2 style: ``transforms(image=..., regression_target=..., **labels) -> dict``)
    of one cube under torch / numpy / python RNGs seeded with ``seed`` (CPU and the cube's device), the
    global RNG states left as they were. ``image`` is what it returns as ``image``, ``target`` what it returns
    as ``regression_target`` (the clean cube, flipped along with the image); keys it adds (an objective's
    labels) are kept. The data loader and the device path (``nnunet_sar_pretrain --transform-on``) both call
    this, so a cube gets the same corruption on either."""
    cube = item["image"]
    s = int(seed)
    devices = [cube.device.index or 0] if cube.device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(s)
            np.random.seed(s)
            random.seed(s)
            out = transforms(**{k: v for k, v in item.items() if k not in ("image", "target")},
                             image=cube.clone(), regression_target=item["target"])
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    target = out.pop("regression_target", None)
    out["target"] = item["target"] if target is None else target
    for k in ("image", "target"):
        out[k] = torch.as_tensor(out[k], dtype=torch.float32).contiguous()
    return {**item, **out}


def transform_batch(transforms, batch: dict, seeds) -> dict:
    """``transforms`` on a batch, cube by cube on the batch's device, each under the seed the data loader
    would have used (``MultiScaleCubes.transform_seed``): the device path of ``--transform-on`` (the loop's
    ``_step``), giving the loader path's cubes."""
    items = [seeded_transform(transforms, {k: v[b] for k, v in batch.items()}, seed) for b, seed in enumerate(seeds)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def fixed_validation_cubes(volumes: list[Volume], patch_size, cubes_per_volume=(1, 1, 2), transforms=None,
                           seed: int = 0, *, scales=SCALES, modalities: list[str] | None = None,
                           epoch: int = 0, intensity_maps=None) -> dict:
    """A fixed, seeded validation set (identical on every call): stacked ``image`` / ``target``
    (N, 1, *patch_size) float32, ``scale`` / ``modality`` (N,) int64, in plan order.

    Pass the training dataset's ``modalities`` so that modality indices agree with training (the default
    is the sorted modalities of ``volumes`` alone). Memory: N * 2 * prod(patch_size) * 4 bytes, N =
    len(volumes) * sum(cubes_per_volume) (1 MiB per cube pair at 32x64x64); keep cubes_per_volume small.
    """
    ds = MultiScaleCubes(volumes, patch_size, scales=scales, cubes_per_volume=cubes_per_volume,
                         modalities=modalities, transforms=transforms, seed=seed, intensity_maps=intensity_maps)
    ds.set_epoch(epoch)
    items = [ds[i] for i in range(len(ds))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
