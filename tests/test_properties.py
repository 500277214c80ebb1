"""Property tests of the multi-scale cube sampler (paper 2.2): any volume the preprocessing can produce
(3D, any side from 1 voxel up, float16 or float32 ``.npy``, values in [0, 1]) and any patch size give
cubes of exactly the patch size, float32, finite and within [0, 1], with and without the Models Genesis
corruptions. (The corruptions alone have their own property tests in test_corruptions.py.)"""
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnunet_sar.pretraining.corruptions import genesis_corruptions
from nnunet_sar.pretraining.cubes import SCALES, MultiScaleCubes, crop_size, fixed_validation_cubes
from nnunet_sar.pretraining.sources import Volume

volume_side = st.integers(min_value=1, max_value=24)  # preprocessing keeps every side >= 1
volume_shape = st.tuples(volume_side, volume_side, volume_side)
patch_side = st.integers(min_value=1, max_value=12)
values = st.sampled_from(["uniform", "zeros", "ones", "binary", "extremes"])


def _array(shape, kind: str, seed: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = {"uniform": lambda: rng.random(shape),
         "zeros": lambda: np.zeros(shape),
         "ones": lambda: np.ones(shape),
         "binary": lambda: (rng.random(shape) > 0.5).astype(np.float64),
         # the closest values to 0 and 1 the dtype holds, and the largest float below 1
         "extremes": lambda: rng.choice([0.0, 1.0, float(np.nextafter(dtype(1), dtype(0))),
                                         float(np.finfo(dtype).tiny)], size=shape)}[kind]()
    return a.astype(dtype)


def _volumes(folder: Path, shapes, kind, seed, dtype):
    vols = []
    for j, shape in enumerate(shapes):
        path = folder / f"v{j}.npy"
        np.save(path, _array(shape, kind, seed + j, dtype))
        vols.append(Volume(str(path), tuple(shape), ("CT", "MRI")[j % 2], "src", f"case{j}", 0))
    return vols


def _check_item(item, patch, n_modalities):
    for key in ("image", "target"):
        t = item[key]
        assert tuple(t.shape) == (1, *patch), (key, t.shape, patch)
        assert t.dtype == torch.float32
        assert bool(torch.isfinite(t).all()), key
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0, (key, float(t.min()), float(t.max()))
    assert item["scale"].dtype == torch.int64 and 0 <= int(item["scale"]) < len(SCALES)
    assert item["modality"].dtype == torch.int64 and 0 <= int(item["modality"]) < n_modalities


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(volume_shape, min_size=1, max_size=3),
       patch=st.tuples(patch_side, patch_side, patch_side),
       dtype=st.sampled_from([np.float16, np.float32]),
       kind=values,
       seed=st.integers(0, 2 ** 31 - 1),
       epoch=st.integers(0, 3),
       cubes=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(1, 2)))
def test_sampler_any_volume_any_patch(shapes, patch, dtype, kind, seed, epoch, cubes):
    with tempfile.TemporaryDirectory() as d:
        vols = _volumes(Path(d), shapes, kind, seed, dtype)
        ds = MultiScaleCubes(vols, patch, cubes_per_volume=cubes, seed=seed % 1000)
        assert len(ds) == len(vols) * sum(cubes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # volumes smaller than a crop are padded, with a warning
            items = [ds[(epoch, i)] for i in range(len(ds))]
        for item in items:
            _check_item(item, patch, len(ds.modalities))
        if kind == "zeros":
            assert all(not item["image"].any() for item in items)
        v, s = ds.plan(epoch)
        for vi in range(len(vols)):  # the ratio of scales per volume is exact
            assert np.bincount(s[v == vi], minlength=3).tolist() == list(cubes)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=volume_shape,
       patch=st.tuples(patch_side, patch_side, patch_side),
       dtype=st.sampled_from([np.float16, np.float32]),
       kind=values,
       seed=st.integers(0, 2 ** 31 - 1),
       share=st.sampled_from([0.0, 0.5, 1.0]))
def test_sampler_with_corruptions_any_volume_any_patch(shape, patch, dtype, kind, seed, share):
    """The corruptions as the CPU loop applies them (inside the dataset), all switched on."""
    transforms = genesis_corruptions(flip_p=0.5, shuffle_p=1.0, nonlinear_p=1.0, paint_p=1.0, inpaint_share=share)
    with tempfile.TemporaryDirectory() as d:
        vols = _volumes(Path(d), [shape], kind, seed, dtype)
        ds = MultiScaleCubes(vols, patch, cubes_per_volume=(1, 1, 1), transforms=transforms, seed=seed % 1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(len(ds)):
                _check_item(ds[i], patch, 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(volume_shape, min_size=1, max_size=2),
       patch=st.tuples(patch_side, patch_side, patch_side),
       dtype=st.sampled_from([np.float16, np.float32]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_fixed_validation_cubes_any_volume(shapes, patch, dtype, seed):
    with tempfile.TemporaryDirectory() as d:
        vols = _volumes(Path(d), shapes, "uniform", seed, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = fixed_validation_cubes(vols, patch, (1, 1, 2), seed=seed % 1000, modalities=["CT", "MRI"])
            b = fixed_validation_cubes(vols, patch, (1, 1, 2), seed=seed % 1000, modalities=["CT", "MRI"])
    n = 4 * len(vols)
    for key in ("image", "target"):
        assert tuple(a[key].shape) == (n, 1, *patch) and a[key].dtype == torch.float32
        assert bool(torch.isfinite(a[key]).all())
        assert float(a[key].min()) >= 0 and float(a[key].max()) <= 1
        assert torch.equal(a[key], b[key])  # fixed: identical on every call
    assert tuple(a["scale"].shape) == (n,) and tuple(a["modality"].shape) == (n,)


@settings(max_examples=200, deadline=None)
@given(shape=volume_shape, fraction=st.sampled_from(SCALES), min_size=st.integers(1, 6))
def test_crop_size_is_positive_and_follows_the_fraction(shape, fraction, min_size):
    """Properties, not the formula again: at least min_size; otherwise the nearest integer to fraction * side
    (within half a voxel); never larger than the side unless min_size forces it; monotone in the side and in
    the fraction (a larger scale never gives a smaller crop)."""
    crop = crop_size(shape, fraction, min_size)
    assert len(crop) == 3 and all(isinstance(c, int) for c in crop)
    for c, s in zip(crop, shape):
        assert c >= min_size
        if c > min_size:  # not clamped: the nearest integer to the exact crop
            assert abs(c - fraction * s) <= 0.5
        else:  # clamped: the exact crop rounds to min_size or below
            assert fraction * s <= min_size + 0.5
        assert c <= max(s, min_size)
    bigger = crop_size([s + 1 for s in shape], fraction, min_size)
    assert all(b >= c for b, c in zip(bigger, crop))
    for larger in (f for f in SCALES if f > fraction):
        assert all(b >= c for b, c in zip(crop_size(shape, larger, min_size), crop))


def test_crop_size_known_values():
    """Hand-computed crops (the paper's 1/2, 1/4, 1/8 of a BraTS volume and of LUNA-like sides), Python's
    round half to even included: 155 / 2 = 77.5 -> 78, 155 / 8 = 19.375 -> 19, 30 / 8 = 3.75 -> 4 (min_size)."""
    assert crop_size((240, 240, 155), 1 / 2) == (120, 120, 78)
    assert crop_size((240, 240, 155), 1 / 4) == (60, 60, 39)
    assert crop_size((240, 240, 155), 1 / 8) == (30, 30, 19)
    assert crop_size((30, 12, 5), 1 / 8) == (4, 4, 4)
    assert crop_size((30, 12, 5), 1 / 8, min_size=1) == (4, 2, 1)
    assert crop_size((50, 18, 10), 1 / 4, min_size=1) == (12, 4, 2)  # 12.5 -> 12, 4.5 -> 4 (half to even), 2.5 -> 2
