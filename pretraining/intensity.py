"""Intensities as nnU-Net will show them (``--intensity nnunet``) or the Models Genesis window (``unit``).

The cache holds every source clipped to its window (CT [-1000, 1000] HU, MRI [0, 4000]) and scaled to
[0, 1] (``sources.py``), the range in which the Models Genesis corruptions are defined. nnU-Net fine-tunes
on its own normalisation of the target instead:
- CT (``CTNormalization``): clip to the target's foreground percentiles 0.5 / 99.5, then subtract the
  foreground mean and divide by its standard deviation (``foreground_intensity_properties_per_channel``
  of the target's plans, e.g. pancreas [-96, 215] HU, 15 % of the pre-training window);
- MRI (``ZScoreNormalization``): z-score; with ``use_mask_for_norm`` (BraTS) over the non-zero region,
  background kept at 0.
The affine part is absorbed by the first norm layer, the window is not. With ``nnunet`` each cube is
corrupted in its [0, 1] view, as Models Genesis defines the corruptions, and then the corrupted input and
the clean target are both mapped voxel-wise as nnU-Net would normalise them: CT sources with the target's
CT parameters when the target has a CT channel, else with the source's own body-voxel statistics
(voxels above -500 HU); MRI volumes z-scored over their non-zero voxels (background stays 0).

A map is 5 numbers per cube, in cache units: (lo, hi, shift, scale, keep_zero):
``f(v) = (clip(v, lo, hi) - shift) / scale``, and 0 where ``keep_zero`` and v == 0.
"""
from __future__ import annotations

import numpy as np
import torch

from nnunet_sar import SARError

from .sources import WINDOWS

SCHEMES = ("unit", "nnunet")
IDENTITY = (0.0, 1.0, 0.0, 1.0, 0.0)
BODY_HU = -500.0  # CT sources without a target CT channel: statistics over voxels above this


def _window(volume_clip) -> tuple[float, float]:
    lo, hi = (float(c) for c in volume_clip)
    return lo, hi - lo


def _to_cache(hu: float, clip) -> float:
    lo, width = _window(clip)
    return (hu - lo) / width


def target_ct_properties(plans_manager, configuration_manager) -> dict | None:
    """The foreground intensity properties of the target's first CT-normalised channel, or None."""
    schemes = list(configuration_manager.normalization_schemes)
    if "CTNormalization" not in schemes:
        return None
    props = plans_manager.plans["foreground_intensity_properties_per_channel"]
    return props[str(schemes.index("CTNormalization"))]


def _ct_map(props: dict, clip) -> tuple:
    _, width = _window(clip)
    return (_to_cache(props["percentile_00_5"], clip), _to_cache(props["percentile_99_5"], clip),
            _to_cache(props["mean"], clip), max(float(props["std"]), 1e-8) / width, 0.0)


def _source_ct_properties(arrays, clip) -> dict:
    """The statistics nnU-Net's planner collects (over foreground), here over body voxels of a source."""
    body = _to_cache(BODY_HU, clip)
    lo, width = _window(clip)
    vals = np.concatenate([a[a > body].astype(np.float32).ravel()[::7] for a in arrays]) * width + lo
    if vals.size == 0:
        raise SARError(f"a CT source has no voxels above {BODY_HU} HU: cannot derive its normalisation")
    p05, p995 = np.percentile(vals, [0.5, 99.5])
    return {"percentile_00_5": float(p05), "percentile_99_5": float(p995), "mean": float(vals.mean()),
            "std": float(vals.std())}


def _mri_map(array) -> tuple:
    nz = array[array > 0].astype(np.float32)
    if nz.size == 0:
        return IDENTITY
    return (0.0, 1.0, float(nz.mean()), max(float(nz.std()), 1e-8), 1.0)


def intensity_maps(volumes, scheme: str, plans_manager=None, configuration_manager=None) -> list:
    """One map per volume (see the module docstring); CT statistics of a source come from all its volumes
    given, so pass them all (every DDP rank then computes the same maps)."""
    if scheme not in SCHEMES:
        raise SARError(f"unknown --intensity {scheme!r}; choose from {', '.join(SCHEMES)}")
    if scheme == "unit":
        return [IDENTITY] * len(volumes)
    ct_props = target_ct_properties(plans_manager, configuration_manager)
    source_props = {}
    maps = []
    for v in volumes:
        array = np.load(v.path, mmap_mode="r")
        if v.modality == "MRI":
            maps.append(_mri_map(array))
            continue
        clip = WINDOWS["CT"]
        props = ct_props
        if props is None:
            if v.source not in source_props:
                same = [np.load(w.path, mmap_mode="r") for w in volumes if w.source == v.source]
                source_props[v.source] = _source_ct_properties(same, clip)
            props = source_props[v.source]
        maps.append(_ct_map(props, clip))
    return maps


def apply_intensity_map(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) cubes in cache units, (B, 5) maps -> the cubes as nnU-Net would normalise them."""
    m = maps.to(device=x.device, dtype=x.dtype).view(maps.shape[0], 5, *[1] * (x.ndim - 1))
    lo, hi, shift, scale, keep_zero = m.unbind(1)
    out = (torch.minimum(torch.maximum(x, lo), hi) - shift) / scale
    return torch.where((keep_zero > 0) & (x == 0), torch.zeros_like(out), out)


def normalise_as_nnunet(batch: dict) -> dict:
    """A batch's ``image`` and ``target`` (when it has one) mapped by its cubes' ``intensity`` maps: run after
    an objective's transforms, which are defined on the [0, 1] window."""
    out = dict(batch)
    for k in ("image", "target"):
        if k in out:
            out[k] = apply_intensity_map(out[k], batch["intensity"])
    return out
