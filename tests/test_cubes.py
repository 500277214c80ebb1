"""Multi-scale cube generator (paper 2.2): plan, crop sizes, determinism, padding, transforms, real data."""
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nnunet_sar.pretraining.cubes import (
    DEFAULT_CUBES_PER_VOLUME,
    SCALES,
    MultiScaleCubes,
    check_patch_size,
    crop_size,
    fixed_validation_cubes,
)
from nnunet_sar.pretraining.sources import Volume, preprocess_sources

# the project's shared real volumes: X/shared/data/real beside a checkout at X/main (any checkout folder name);
# NNUNET_SAR_REAL_DATA points elsewhere. NNUNET_SAR_REQUIRE_REAL_DATA=1 (.ci/run) turns their absence into a failure.
REAL = Path(os.environ.get("NNUNET_SAR_REAL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
REAL_FILES = ("example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "breast1_image.nrrd")


def require_real_data():
    missing = [f for f in REAL_FILES if not (REAL / f).is_file()]
    if not missing:
        return
    message = f"real CT/MRI volumes missing from {REAL}: {', '.join(missing)}"
    if os.environ.get("NNUNET_SAR_REQUIRE_REAL_DATA") == "1":
        pytest.fail(message + " (NNUNET_SAR_REQUIRE_REAL_DATA=1; set NNUNET_SAR_REAL_DATA to their folder)")
    pytest.skip(message)


def make_volume(tmp_path, name, shape, modality="CT", dtype=np.float16, values=None):
    a = np.random.default_rng(abs(hash(name)) % 2**32).random(shape) if values is None else values
    path = tmp_path / f"{name}.npy"
    np.save(path, a.astype(dtype))
    return Volume(str(path), tuple(shape), modality, "src", name, 0)


@pytest.fixture
def vols(tmp_path):
    return [make_volume(tmp_path, "a", (40, 36, 24), "CT"), make_volume(tmp_path, "b", (32, 48, 20), "MRI"),
            make_volume(tmp_path, "c", (24, 24, 24), "MRI")]


def test_constants_and_crop_size():
    assert SCALES == (1 / 2, 1 / 4, 1 / 8)
    assert DEFAULT_CUBES_PER_VOLUME == (16, 16, 32)
    assert crop_size((128, 128, 64), 1 / 2) == (64, 64, 32)
    assert crop_size((128, 128, 64), 1 / 4) == (32, 32, 16)
    assert crop_size((128, 128, 64), 1 / 8) == (16, 16, 8)
    assert crop_size((100, 20, 12), 1 / 8) == (12, 4, 4)  # min_size 4
    assert crop_size((100, 20, 12), 1 / 8, min_size=1) == (12, 2, 2)


def test_plan_exact_ratio_and_len(vols):
    ds = MultiScaleCubes(vols, (16, 16, 8))
    assert len(ds) == 3 * 64
    for epoch in (0, 1, 5):
        ds.set_epoch(epoch)
        v, s = ds.plan()
        counts = Counter(zip(v.tolist(), s.tolist()))
        assert counts == {(i, j): n for i in range(3) for j, n in enumerate((16, 16, 32))}
    p0, p1 = ds.plan(0), ds.plan(1)
    assert not np.array_equal(p0[0], p1[0])  # reshuffled per epoch
    ds2 = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2))
    assert len(ds2) == 12
    assert Counter(ds2.plan()[1].tolist()) == {0: 3, 1: 3, 2: 6}
    items = [ds2[i] for i in range(len(ds2))]
    assert [int(it["scale"]) for it in items] == ds2.plan()[1].tolist()
    with pytest.raises(IndexError):
        ds2[12]
    # one row of counts per volume (Table 1's per-source counts): LiTS-like volumes get twice LUNA's
    ds3 = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=[(1, 1, 2), (2, 2, 4), (0, 3, 0)])
    assert len(ds3) == 4 + 8 + 3
    assert Counter(zip(*(a.tolist() for a in ds3.plan()))) == {(0, 0): 1, (0, 1): 1, (0, 2): 2, (1, 0): 2, (1, 1): 2,
                                                                (1, 2): 4, (2, 1): 3}
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=[(1, 1, 2), (2, 2, 4)])


def test_item_shapes_dtypes_modality(vols):
    ds = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2))
    assert ds.modalities == ["CT", "MRI"]
    v_idx = ds.plan()[0]
    for i in range(len(ds)):
        it = ds[i]
        assert set(it) == {"image", "target", "scale", "modality", "intensity"}
        assert it["intensity"].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]  # no intensity maps given: the identity
        for k in ("image", "target"):
            assert it[k].shape == (1, 16, 16, 8) and it[k].dtype == torch.float32
        assert it["scale"].dtype == torch.int64 and it["scale"].shape == ()
        assert it["modality"].dtype == torch.int64
        assert int(it["modality"]) == (0 if vols[v_idx[i]].modality == "CT" else 1)
        assert torch.equal(it["image"], it["target"])
        assert 0 <= float(it["image"].min()) and float(it["image"].max()) <= 1
    ds_mod = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2), modalities=["MRI", "CT"])
    assert int(ds_mod[0]["modality"]) == (1 if vols[v_idx[0]].modality == "CT" else 0)
    with pytest.raises(ValueError, match="CT"):
        MultiScaleCubes(vols, (16, 16, 8), modalities=["MRI"])


@pytest.mark.parametrize("scale", SCALES)
def test_crops_are_true_fractions(tmp_path, scale):
    """With patch == crop size no resizing happens: the cube is a verbatim sub-block of the volume."""
    shape = (128, 96, 64)
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # unique, exact in float32
    v = make_volume(tmp_path, "coords", shape, dtype=np.float32, values=values)
    crop = crop_size(shape, scale)
    assert all(abs(c - s * scale) <= 0.5 for c, s in zip(crop, shape))
    ds = MultiScaleCubes([v], crop, scales=(scale,), cubes_per_volume=(8,))
    starts = set()
    for i in range(len(ds)):
        cube = ds[i]["image"][0].numpy()
        x, y, z = np.unravel_index(int(cube[0, 0, 0]), shape)
        np.testing.assert_array_equal(cube, values[x:x + crop[0], y:y + crop[1], z:z + crop[2]])
        starts.add((x, y, z))
    assert len(starts) > 1  # positions are random


def test_resize_is_trilinear_interpolation_of_the_crop(tmp_path):
    shape = (64, 64, 32)
    values = np.random.default_rng(0).random(shape).astype(np.float32)
    v = make_volume(tmp_path, "r", shape, dtype=np.float32, values=values)
    ds = MultiScaleCubes([v], (32, 32, 16), scales=(1 / 4,), cubes_per_volume=(4,))  # crop 16x16x8 -> 32x32x16
    # recover the crop position from the same generator the dataset uses
    rng = np.random.default_rng((0, 0, 2))
    st = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, (16, 16, 8))]
    block = torch.from_numpy(values[st[0]:st[0] + 16, st[1]:st[1] + 16, st[2]:st[2] + 8].copy())
    expected = F.interpolate(block[None, None], size=(32, 32, 16), mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(ds[2]["image"], expected)


def test_deterministic_across_instances_and_epochs(vols):
    a = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2), seed=7)
    b = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2), seed=7)
    c = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2), seed=8)
    for i in (0, 5, 11):
        torch.testing.assert_close(a[i], b[i], rtol=0, atol=0)
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(len(a)))
    a.set_epoch(3)
    b.set_epoch(3)
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(len(a)))
    for i in range(len(a)):
        torch.testing.assert_close(a[i], b[i], rtol=0, atol=0)
        torch.testing.assert_close(a[i], b[(3, i)], rtol=0, atol=0)  # (epoch, i) index
    b.set_epoch(0)
    torch.testing.assert_close(b[(3, 4)], a[4], rtol=0, atol=0)


def _collect(ds, workers):
    dl = DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers)
    batches = list(dl)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_same_cubes_with_0_and_2_workers(vols):
    ds = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2), seed=1)
    ds.set_epoch(2)
    ds[0]  # opens a memmap in the main process; workers must reopen their own
    r0 = _collect(ds, 0)
    r2 = _collect(ds, 2)
    assert r0["image"].shape == (12, 1, 16, 16, 8) and r0["scale"].shape == (12,)
    for k in r0:
        assert torch.equal(r0[k], r2[k]), k


def test_tiny_volume_is_padded_not_dropped(tmp_path):
    tiny = make_volume(tmp_path, "tiny", (3, 20, 6), values=np.ones((3, 20, 6)))
    ds = MultiScaleCubes([tiny], (8, 8, 8), cubes_per_volume=(2, 2, 4))
    with pytest.warns(UserWarning, match="tiny.npy") as rec:
        items = [ds[i] for i in range(len(ds))]
    assert len([w for w in rec if "tiny.npy" in str(w.message)]) == 1  # once per volume
    assert len(items) == 8
    small = [it for it in items if int(it["scale"]) == 2]
    # small crop is (4, 4, 4): axis 0 has 3 voxels, so one plane of zeros; resized that shows as dark values
    assert all(float(it["image"].min()) < 0.5 and float(it["image"].max()) == 1.0 for it in small)


def test_transforms_seeded_and_rng_untouched(vols):
    class NoiseFlip:  # batchgeneratorsv2-style: kwargs in, dict out; corrupts image, flips both
        def __call__(self, **d):
            flip = bool(torch.rand(()) < 0.5)  # torch, numpy and python RNGs all seeded per item
            img = d["image"] + float(np.random.uniform(0.05, 0.1)) * torch.randn_like(d["image"]) + random.random()
            tgt = d["regression_target"]
            if flip:
                img, tgt = img.flip(1), tgt.flip(1)
            return {"image": img, "regression_target": tgt}

    a = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2), transforms=NoiseFlip(), seed=2)
    b = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2), transforms=NoiseFlip(), seed=2)
    plain = MultiScaleCubes(vols, (16, 16, 8), cubes_per_volume=(1, 1, 2), seed=2)
    torch.manual_seed(123)
    np.random.seed(123)
    state = (torch.get_rng_state(), np.random.get_state()[1].copy())
    for i in range(len(a)):
        ia, ib, ip = a[i], b[i], plain[i]
        torch.testing.assert_close(ia, ib, rtol=0, atol=0)
        assert not torch.equal(ia["image"], ia["target"])
        assert torch.equal(ia["target"], ip["target"]) or torch.equal(ia["target"], ip["target"].flip(1))
    assert torch.equal(torch.get_rng_state(), state[0])
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_check_patch_size():
    # the paper's 64x64x32 cube is (x, y, z): (32, 64, 64) in nnU-Net's (z, y, x) order
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]  # total (8, 16, 16)
    check_patch_size((32, 64, 64), strides)
    check_patch_size((32, 64, 64), [1, 2, 2, 2])
    with pytest.raises(ValueError) as e:
        check_patch_size((36, 64, 64), strides)
    assert "(36, 64, 64)" in str(e.value) and "(8, 16, 16)" in str(e.value)
    with pytest.raises(ValueError, match="(32, 64, 48)"):
        check_patch_size((32, 64, 48), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]])


def test_fixed_validation_cubes(vols):
    a = fixed_validation_cubes(vols, (16, 16, 8), (1, 1, 2), None, seed=5)
    b = fixed_validation_cubes(vols, (16, 16, 8), (1, 1, 2), None, seed=5)
    assert a["image"].shape == (12, 1, 16, 16, 8) and a["target"].shape == (12, 1, 16, 16, 8)
    assert a["scale"].shape == (12,) and a["modality"].dtype == torch.int64
    for k in a:
        assert torch.equal(a[k], b[k])
    only_mri = fixed_validation_cubes(vols[1:], (16, 16, 8), (1, 1, 2), None, seed=5, modalities=["CT", "MRI"])
    assert set(only_mri["modality"].tolist()) == {1}


def test_real_ct_and_mri(tmp_path):
    require_real_data()
    ct, mr = tmp_path / "ct", tmp_path / "mr"
    ct.mkdir()
    mr.mkdir()
    os.symlink(REAL / "example_ct_sm.nii.gz", ct / "example_ct_sm.nii.gz")
    for f in ("example_mr_sm.nii.gz", "breast1_image.nrrd"):
        os.symlink(REAL / f, mr / f)
    vols = preprocess_sources([f"{ct}:CT", f"{mr}:mri"], str(tmp_path / "cache"), num_processes=2, progress=False)
    assert [(v.source, v.case, v.modality) for v in vols] == [
        ("ct", "example_ct_sm", "CT"), ("mr", "breast1_image", "MRI"), ("mr", "example_mr_sm", "MRI")]
    for v, f in zip(vols, ("example_ct_sm.nii.gz", "breast1_image.nrrd", "example_mr_sm.nii.gz")):
        img = sitk.ReadImage(str(REAL / f))
        expected = [s * sp for s, sp in zip(img.GetSize()[::-1], img.GetSpacing()[::-1])]  # mm, numpy order
        assert all(abs(a - e) <= 1 for a, e in zip(v.shape, expected)), (f, v.shape, expected)
        a = np.load(v.path, mmap_mode="r")
        assert a.shape == v.shape and float(a.min()) == 0.0 and float(a.max()) == 1.0
    ct_arr = np.load(vols[0].path).astype(np.float32)
    assert 0.0 < float(np.median(ct_arr)) < 0.6  # air at 0, soft tissue near 0.5 of [-1000, 1000]

    ds = MultiScaleCubes(vols, (32, 64, 64), cubes_per_volume=(1, 1, 2), seed=0)  # the paper's cube, (z, y, x)
    assert ds.modalities == ["CT", "MRI"]
    for i in range(len(ds)):
        it = ds[i]
        assert it["image"].shape == (1, 32, 64, 64)
        assert 0.0 <= float(it["image"].min()) and float(it["image"].max()) <= 1.0
        v = vols[int(ds.plan()[0][i])]
        assert int(it["modality"]) == ds.modalities.index(v.modality)


@pytest.mark.parametrize("shape", [(30, 30, 19), (120, 120, 78), (7, 5, 3), (130, 140, 150), (16, 16, 16), (64, 9, 33)])
@pytest.mark.parametrize("size", [(128, 128, 128), (32, 64, 64), (16, 16, 16), (5, 7, 3)])
def test_separable_resize_equals_trilinear_interpolation(shape, size):
    from nnunet_sar.pretraining.cubes import resize_trilinear
    t = torch.from_numpy(np.random.default_rng(sum(shape)).random(shape, dtype=np.float32))
    out = resize_trilinear(t, size)
    expected = F.interpolate(t[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_real_data_absence_fails_when_required(tmp_path, monkeypatch):
    """CI must not pass by skipping: with NNUNET_SAR_REQUIRE_REAL_DATA=1 a missing folder fails the test."""
    import sys
    monkeypatch.setattr(sys.modules[__name__], "REAL", tmp_path / "absent")
    monkeypatch.setenv("NNUNET_SAR_REQUIRE_REAL_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="real CT/MRI volumes missing"):
        require_real_data()
    monkeypatch.delenv("NNUNET_SAR_REQUIRE_REAL_DATA")
    with pytest.raises(pytest.skip.Exception):
        require_real_data()


def test_real_data_is_found_beside_the_checkout():
    """A checkout at X/<any name> finds X/shared/data/real (the project's layout), unless the env points elsewhere."""
    if os.environ.get("NNUNET_SAR_REAL_DATA"):
        pytest.skip("NNUNET_SAR_REAL_DATA set")
    checkout = Path(__file__).resolve().parents[1]
    assert REAL == checkout.parent / "shared" / "data" / "real"
    if os.environ.get("NNUNET_SAR_REQUIRE_REAL_DATA") == "1":
        assert all((REAL / f).is_file() for f in REAL_FILES), REAL
