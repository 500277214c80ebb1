"""Models Genesis image corruptions as batchgeneratorsv2 transforms.

SAR (paper section 2.1) follows Models Genesis (Zhou et al.) and restores a sub-volume ``x`` from a
corrupted copy ``tau(x)``; the corruptions are, in this order (Models Genesis ``generate_pair``):

1. flips            (``GenesisFlip``)          p = 0.4 per attempt, up to 3 attempts, one random axis
                                                each; applied to ``image`` AND ``regression_target``
2. local shuffling  (``LocalPixelShuffling``)  p = 0.5
3. non-linear map   (``NonLinearIntensity``)   p = 0.9, cubic Bezier, inverted half the time
4. painting         (``ImagePainting``)        p = 0.9; in-painting with prob 0.2, else out-painting

Every transform works on one sample, a torch tensor shaped (C, X, Y, Z) (2-D (C, X, Y) works too),
with torch ops only, so the same code runs on a CUDA tensor. Small parameters (box sizes, control
points, ...) come from torch's global CPU RNG; bulk random numbers (noise, permutation keys) are drawn
on the tensor's device with torch's default generator for that device (CPU painting noise: numpy's
PCG64 seeded from torch's RNG, see ``uniform_noise``). ``torch.manual_seed`` (or
``torch.random.fork_rng``) therefore makes a CPU run reproducible.

**Intensity assumption.** Models Genesis' corruptions assume intensities in [0, 1]: painting fills
with uniform noise in [0, 1) and the non-linear map is a map of [0, 1] onto [0, 1] (inputs outside
are clipped by it). Scale the pre-training cubes to [0, 1] *before* corrupting them; z-scored data
would get noise and intensity maps on the wrong scale.

The data dict carries ``image`` (to corrupt) and ``regression_target`` (the clean cube). Only the
flips touch ``regression_target`` (and ``segmentation`` if present); every other transform is an
``ImageOnlyTransform``. None of the transforms here modifies its input in place, so ``image`` and
``regression_target`` may even be the same tensor.

Differences from the numpy reference, on purpose:

* Local shuffling tiles the cube with a grid of equal boxes (random side per axis in
  [1, max(1, side // 10)], random grid offset) instead of 10,000 overlapping random boxes; voxels are
  permuted within their box, so the result is an exact permutation of the input (the reference
  copies shuffled windows of the original on top of each other, which is not). Partial boxes at the
  faces are left unshuffled: the tiled region covers on average ~90 % of the cube, the reference's
  overlapping boxes cover ~85 % (64x64x32) to ~73 % (128^3). For speed, each box takes one of a pool
  of K uniformly random permutations (K >= 8, up to one per box, chosen so that about
  ``pool_elements`` keys are sorted); each box's permutation is uniform, boxes are not independent
  of each other when K < number of boxes.
* The non-linear map is made monotone (x and y of the sampled curve sorted); "inverted" means
  y -> 1 - y, a decreasing map with 0 -> 1 and 1 -> 0. It is applied through a look-up table on a
  uniform grid (nearest entry, ``lut_size`` entries), which is exact at 0 and 1.
* Box / window positions fall back to a smaller margin than 3 voxels when the cube is too small for
  the reference's ``randint(3, side - size - 3)`` (the reference crashes there).
"""
from __future__ import annotations

import copy
import functools
import math
from typing import List, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

__all__ = [
    "GenesisFlip",
    "LocalPixelShuffling",
    "NonLinearIntensity",
    "ImagePainting",
    "genesis_corruptions",
    "corrupt",
    "tune_malloc",
]


def tune_malloc(mmap_threshold: int = 32 * 1024 * 1024, trim_threshold: int = 512 * 1024 * 1024) -> bool:
    """Opt-in, process-wide: keep freed large blocks in glibc's heap instead of returning them to
    the OS. CPU corruption of big cubes allocates a few fresh multi-MB tensors per cube; with glibc's
    defaults each one is mmap'ed / trimmed and page-faulted again, which costs more than the maths
    (128^3 cubes: roughly 25-35 -> 60 cubes/s on one thread). Call it once per (worker) process,
    e.g. in a DataLoader ``worker_init_fn``; the same as setting MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ in the environment. Returns False (doing nothing) without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
        ok = (libc.mallopt(m_trim_threshold, int(trim_threshold)) == 1) and ok
        return bool(ok)
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------
# small random helpers (torch global CPU RNG)
# ----------------------------------------------------------------------------------------------
def _rand() -> float:
    return float(torch.rand(()))


def uniform_noise(shape, device) -> torch.Tensor:
    """Uniform noise in [0, 1), float32, on ``device``. On the CPU it comes from numpy's PCG64, seeded
    from torch's RNG (so ``torch.manual_seed`` still fixes it): about twice as fast as torch's Mersenne
    Twister, and filling a 128^3 cube with noise is the largest single cost of out-painting."""
    if torch.device(device).type != "cpu":
        return torch.rand(shape, device=device)
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))
    return torch.from_numpy(rng.random(math.prod(shape), dtype=np.float32)).view(tuple(shape))


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi], both inclusive (like Python's random.randint)."""
    if hi <= lo:
        return int(lo)
    return int(torch.randint(lo, hi + 1, ()))


def _place(side: int, size: int, margin: int = 3) -> int:
    """Start of a window of ``size`` voxels in ``[0, side)``: randint(margin, side - size - margin)
    as in the reference; with a smaller margin (symmetric, as large as fits) for tiny cubes."""
    size = min(size, side)
    free = side - size
    m = min(margin, free // 2)
    return _randint(m, free - m)


# ----------------------------------------------------------------------------------------------
# 1. flips
# ----------------------------------------------------------------------------------------------
class GenesisFlip(MirrorTransform):
    """Models Genesis flips: up to ``max_flips`` attempts; each attempt succeeds with probability
    ``p`` (the reference stops at the first failure) and flips one uniformly chosen spatial axis.
    Applied to image, regression_target and segmentation alike (batchgeneratorsv2 MirrorTransform).
    Flipping the same axis twice cancels out; ``params['n_flips']`` counts the successful attempts,
    ``params['axes']`` holds the net flipped axes."""

    def __init__(self, p: float = 1.0, max_flips: int = 3):
        super().__init__(allowed_axes=())
        self.p = p
        self.max_flips = max_flips

    def get_parameters(self, **data_dict) -> dict:
        ref = data_dict.get("image")
        if ref is None:
            ref = data_dict.get("regression_target")
        ndim = ref.ndim - 1
        flips = [0] * ndim
        n = 0
        while n < self.max_flips and _rand() < self.p:
            flips[_randint(0, ndim - 1)] ^= 1
            n += 1
        return {"axes": [d for d in range(ndim) if flips[d]], "n_flips": n}


# ----------------------------------------------------------------------------------------------
# 2. local pixel shuffling
# ----------------------------------------------------------------------------------------------
class LocalPixelShuffling(ImageOnlyTransform):
    """Permutes voxels within small boxes (Models Genesis local pixel shuffling), applied with
    probability ``p``.

    The cube is tiled with a grid of boxes of side ``box_size[d]`` in [1, max(1, side_d // 10)]
    (drawn per cube and axis) starting at a random ``offset[d]`` in [0, box_size[d]); the
    ``n_boxes[d]`` whole boxes per axis are shuffled, partial boxes at the faces stay as they are.
    All channels get the same permutation. The output is a permutation of the input: every voxel
    stays inside its box, i.e. moves less than ``box_size[d]`` along axis d.
    """

    def __init__(self, p: float = 1.0, max_box_fraction: float = 0.1, pool_elements: int = 16384,
                 min_pool: int = 8):
        super().__init__()
        self.p = p
        self.max_box_fraction = max_box_fraction
        self.pool_elements = pool_elements
        self.min_pool = min_pool

    def get_parameters(self, **data_dict) -> dict:
        shape = tuple(data_dict["image"].shape[1:])
        if not _rand() < self.p:
            return {"apply": False}
        box, offset, n_boxes = [], [], []
        for s in shape:
            b = _randint(1, max(1, int(s * self.max_box_fraction)))
            o = _randint(0, b - 1)
            box.append(b)
            offset.append(o)
            n_boxes.append((s - o) // b)
        return {"apply": True, "box_size": tuple(box), "offset": tuple(offset),
                "n_boxes": tuple(n_boxes)}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        if not params["apply"]:
            return img
        box, offset, n_boxes = params["box_size"], params["offset"], params["n_boxes"]
        L = math.prod(box)
        nb = math.prod(n_boxes)
        if L == 1 or nb == 0:
            return img
        nd = len(box)
        C = img.shape[0]
        region = (slice(None),) + tuple(slice(o, o + n * b) for o, n, b in zip(offset, n_boxes, box))
        split = [C] + [v for n, b in zip(n_boxes, box) for v in (n, b)]
        to_boxes = [0] + [1 + 2 * d for d in range(nd)] + [2 + 2 * d for d in range(nd)]
        # (C, n0, b0, n1, b1, ...) -> (C, n0, n1, ..., b0, b1, ...) -> (C, nb, L)
        boxes = img[region].view(split).permute(to_boxes).reshape(C, nb, L)

        # pool of K uniformly random permutations of the L voxels of a box; each box picks one
        dev = img.device
        K = min(nb, max(self.min_pool, self.pool_elements // L))
        pool = torch.rand(K, L, device=dev).argsort(dim=-1).to(torch.int32)
        if K < nb:
            pool = pool.index_select(0, torch.randint(0, K, (nb,), device=dev, dtype=torch.int32))
        flat = pool.add_(torch.arange(0, nb * L, L, device=dev, dtype=torch.int32).unsqueeze(1))
        shuffled = boxes.reshape(C, nb * L).index_select(1, flat.view(-1))

        out = img.clone()
        from_boxes = [0] * (2 * nd + 1)
        for i, a in enumerate(to_boxes):
            from_boxes[a] = i
        out[region].view(split).copy_(
            shuffled.view([C] + list(n_boxes) + list(box)).permute(from_boxes))
        return out


# ----------------------------------------------------------------------------------------------
# 3. non-linear intensity transformation
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _bezier_basis(n_points: int) -> np.ndarray:
    """Bernstein weights of P1, P2 and P3 = (1, 1) at n_points values of t (P0 = (0, 0) adds 0)."""
    t = np.linspace(0.0, 1.0, n_points)
    s = 1.0 - t
    w = np.stack([3 * s * s * t, 3 * s * t * t, t * t * t])
    w.setflags(write=False)
    return w


class NonLinearIntensity(ImageOnlyTransform):
    """Monotone intensity map of [0, 1] onto [0, 1] from a cubic Bezier curve through (0, 0) and
    (1, 1) with two uniformly random control points (x and y of the ``n_points`` sampled curve
    points sorted separately, so the map is non-decreasing), inverted (y -> 1 - y) with probability
    ``p_invert``; applied with probability ``p``. Inputs are clipped to [0, 1]."""

    def __init__(self, p: float = 1.0, p_invert: float = 0.5, n_points: int = 1000,
                 lut_size: int = 8192):
        super().__init__()
        self.p = p
        self.p_invert = p_invert
        self.n_points = n_points
        self.lut_size = lut_size

    def get_parameters(self, **data_dict) -> dict:
        if not _rand() < self.p:
            return {"apply": False}
        return {"apply": True, "control_points": torch.rand(2, 2, dtype=torch.float64),
                "invert": _rand() < self.p_invert}

    def curve(self, control_points: torch.Tensor, invert: bool) -> Tuple[np.ndarray, np.ndarray]:
        """Sorted (x, y) samples of the map (float64 numpy arrays, a small parameter table)."""
        cp = control_points.double().numpy()
        w = _bezier_basis(self.n_points)
        xs = np.sort(cp[0, 0] * w[0] + cp[1, 0] * w[1] + w[2])
        ys = np.sort(cp[0, 1] * w[0] + cp[1, 1] * w[1] + w[2])
        if invert:
            ys = 1.0 - ys
        return xs, ys

    def lut(self, control_points: torch.Tensor, invert: bool) -> torch.Tensor:
        """The map sampled on a uniform grid of ``lut_size`` points in [0, 1] (np.interp on the
        curve samples, as the reference applies it), float32 CPU tensor; exact at 0 and 1."""
        xs, ys = self.curve(control_points, invert)
        lut = np.interp(np.linspace(0.0, 1.0, self.lut_size), xs, ys)
        lut[0], lut[-1] = ys[0], ys[-1]  # 0 -> 0 and 1 -> 1 (inverted: 0 -> 1, 1 -> 0)
        return torch.from_numpy(np.clip(lut, 0.0, 1.0).astype(np.float32))

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        if not params["apply"]:
            return img
        n = self.lut_size
        lut = self.lut(params["control_points"], params["invert"]).to(img.device)
        v = img.to(torch.float32, copy=True).clamp_(0.0, 1.0).mul_(n - 1).add_(0.5)
        idx = v.to(torch.int32).view(-1)  # truncation == floor(x * (n - 1) + 0.5): nearest entry
        torch.index_select(lut, 0, idx, out=v.view(-1))
        return v.to(img.dtype)

    def apply(self, data_dict: dict, **params) -> dict:
        """The mapped cube, and under ``inverted`` whether the map turned it upside down: restoration must
        then tell the cube's polarity from its content (the transfer check reports those cubes apart)."""
        data_dict = super().apply(data_dict, **params)
        data_dict["inverted"] = torch.tensor(bool(params["apply"] and params["invert"]))
        return data_dict


# ----------------------------------------------------------------------------------------------
# 4./5. in-painting or out-painting
# ----------------------------------------------------------------------------------------------
class ImagePainting(ImageOnlyTransform):
    """Models Genesis painting, applied with probability ``p``; in-painting with probability
    ``inpaint_share``, otherwise out-painting (mutually exclusive).

    * in-painting: up to ``max_inpaint_boxes`` boxes (each with prob. ``p_more``, the first one
      too), sides randint(side // 6, side // 3) per axis, >= ``margin`` voxels from the border,
      filled with uniform noise in [0, 1).
    * out-painting: the cube is replaced by uniform noise in [0, 1) except one window (sides
      side - randint(3 * side // 7, 4 * side // 7), i.e. in [ceil(3/7 side), ceil(4/7 side)],
      >= ``margin`` voxels from the border) and up to ``max_extra_windows`` more such windows (each
      with prob. ``p_more``), which keep the input's voxels.

    ``params['boxes']`` lists the boxes (in-painting) / windows (out-painting) as tuples of
    (start, stop) per spatial axis. Noise is drawn per channel on the image's device. With ``mark``
    the painted voxels are returned too (``marking``: the validation cubes only, training reads none).
    """

    def __init__(self, p: float = 1.0, inpaint_share: float = 0.2, p_more: float = 0.95,
                 max_inpaint_boxes: int = 5, max_extra_windows: int = 4, margin: int = 3, mark: bool = False):
        super().__init__()
        self.mark = mark
        self.p = p
        self.inpaint_share = inpaint_share
        self.p_more = p_more
        self.max_inpaint_boxes = max_inpaint_boxes
        self.max_extra_windows = max_extra_windows
        self.margin = margin

    def _box(self, shape, sizes) -> Tuple[Tuple[int, int], ...]:
        box = []
        for s, w in zip(shape, sizes):
            w = max(1, min(w, s))
            lo = _place(s, w, self.margin)
            box.append((lo, lo + w))
        return tuple(box)

    def get_parameters(self, **data_dict) -> dict:
        shape = tuple(data_dict["image"].shape[1:])
        if not _rand() < self.p:
            return {"apply": False}
        boxes: List[Tuple[Tuple[int, int], ...]] = []
        if _rand() < self.inpaint_share:
            mode = "in"
            while len(boxes) < self.max_inpaint_boxes and _rand() < self.p_more:
                boxes.append(self._box(shape, [_randint(s // 6, s // 3) for s in shape]))
        else:
            mode = "out"
            n_windows = 1
            while n_windows < 1 + self.max_extra_windows and _rand() < self.p_more:
                n_windows += 1
            for _ in range(n_windows):
                boxes.append(self._box(shape, [s - _randint(3 * s // 7, 4 * s // 7) for s in shape]))
        return {"apply": True, "mode": mode, "boxes": boxes}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        if not params["apply"]:
            return img
        boxes = params["boxes"]
        C = img.shape[0]
        if params["mode"] == "in":
            out = img.clone()
            for box in boxes:
                sl = (slice(None),) + tuple(slice(a, b) for a, b in box)
                out[sl] = uniform_noise((C,) + tuple(b - a for a, b in box), img.device).to(img.dtype)
            return out
        out = uniform_noise(img.shape, img.device).to(img.dtype)
        for box in boxes:
            sl = (slice(None),) + tuple(slice(a, b) for a, b in box)
            out[sl] = img[sl]
        return out

    def apply(self, data_dict: dict, **params) -> dict:
        """The painted cube, and with ``mark`` under ``painted`` the voxels the noise replaced: there restoration
        must invent what the input no longer shows (the transfer check reports them apart)."""
        data_dict = super().apply(data_dict, **params)
        if self.mark:
            data_dict["painted"] = painted_voxels(data_dict["image"].shape, params, data_dict["image"].device)
        return data_dict


def marking(transforms):
    """A copy of ``transforms`` whose ``ImagePainting`` marks the voxels it paints: for the fixed validation
    cubes the transfer check splits by them; the same draws, so the same cubes. None stays None."""
    out = copy.deepcopy(transforms)
    stack = [out]
    while stack:
        t = stack.pop()
        if isinstance(t, ImagePainting):
            t.mark = True
        stack.extend(getattr(t, "transforms", []))
    return out


def painted_voxels(shape, params: dict, device=None) -> torch.Tensor:
    """The voxels ``ImagePainting`` with ``params`` fills with noise: its boxes (in-painting), or all but its
    windows (out-painting); none when it did not apply. A bool tensor of ``shape`` (C, X, Y, Z)."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if params["apply"]:
        inside = params["mode"] == "in"
        mask.fill_(not inside)
        for box in params["boxes"]:
            mask[(slice(None),) + tuple(slice(a, b) for a, b in box)] = inside
    return mask


# ----------------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------------
GENESIS_PROBABILITIES = {"flip_p": 0.4, "shuffle_p": 0.5, "nonlinear_p": 0.9, "invert_p": 0.5, "paint_p": 0.9,
                         "inpaint_share": 0.2}


def genesis_corruptions(flip_p: float = 0.4, shuffle_p: float = 0.5, nonlinear_p: float = 0.9, invert_p: float = 0.5,
                        paint_p: float = 0.9, inpaint_share: float = 0.2) -> ComposeTransforms:
    """The Models Genesis corruption pipeline (its public config by default, GENESIS_PROBABILITIES):
    flip -> local shuffle -> non-linear (inverted with ``invert_p`` of the cubes it maps) -> painting (in- or
    out-)."""
    return ComposeTransforms([
        GenesisFlip(p=flip_p),
        LocalPixelShuffling(p=shuffle_p),
        NonLinearIntensity(p=nonlinear_p, p_invert=invert_p),
        ImagePainting(p=paint_p, inpaint_share=inpaint_share),
    ])


def corrupt(cube: torch.Tensor, transforms) -> Tuple[torch.Tensor, torch.Tensor]:
    """One clean cube (C, X, Y, Z) with intensities in [0, 1] -> (corrupted input, target).

    The target is the clean cube with the same flips as the input (a new tensor; ``cube`` itself is
    never modified by the transforms of this module). Both keep ``cube``'s dtype and device."""
    if cube.ndim < 3:
        raise ValueError(f"expected a (C, X, Y[, Z]) tensor, got shape {tuple(cube.shape)}")
    out = transforms(image=cube, regression_target=cube.clone())
    image, target = out["image"], out["regression_target"]
    if image is cube:  # nothing applied: hand back a tensor of its own
        image = cube.clone()
    return image, target

