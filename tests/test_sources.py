"""Sources and their one-time preprocessing (paper 3.1): listing, modality, resampling, clipping, cache, split."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_sar.pretraining.sources import (
    SourceError,
    Volume,
    list_source_images,
    parse_source,
    preprocess_sources,
    split_train_val,
)

SHAPE = (30, 40, 20)  # numpy / nnU-Net axis order
SPACING = (2.0, 1.0, 1.5)  # nnU-Net order; SimpleITK gets it reversed
EXPECTED = tuple(int(round(s * sp)) for s, sp in zip(SHAPE, SPACING))  # (60, 40, 30) at 1 mm


def write_image(path, arr, spacing=SPACING):
    """Write ``arr`` (nnU-Net axis order) so that nnU-Net reads it back as ``arr`` with ``spacing``."""
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, str(path))
    return str(path)


def ct_volume(seed=0):
    """0 HU body with one +3000 HU and one -2000 HU voxel, plus mild noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 20, SHAPE).astype(np.float32)
    a[5, 5, 5] = 3000
    a[24, 34, 14] = -2000
    return a


def mri_volume(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 800, SHAPE).astype(np.float32)


def make_raw_dataset(raw, name, channel_names, n_cases=3, make=None):
    folder = raw / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for c in range(n_cases):
        for ch in range(len(channel_names)):
            arr = make(c, ch) if make else mri_volume(10 * c + ch)
            write_image(folder / "imagesTr" / f"case_{c:03d}_{ch:04d}.nii.gz", arr)
    dj = {"channel_names": {str(i): n for i, n in enumerate(channel_names)}, "labels": {"background": 0, "x": 1},
          "numTraining": n_cases, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dj))
    return folder


@pytest.fixture
def raw(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    return raw


# --------------------------------------------------------------------------------------------- parsing
def test_parse_source(tmp_path):
    assert parse_source("Dataset902_Foo") == ("Dataset902_Foo", None)
    assert parse_source("Dataset902_Foo:ct") == ("Dataset902_Foo", "CT")
    assert parse_source("/data/imgs:MRI") == ("/data/imgs", "MRI")
    assert parse_source("7:Mri") == ("7", "MRI")
    with pytest.raises(SourceError, match="PET"):
        parse_source("/data/imgs:PET")
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_source(str(odd)) == (str(odd), None)
    assert parse_source(str(odd) + ":CT") == (str(odd), "CT")
    with pytest.raises(SourceError):
        parse_source("")


# --------------------------------------------------------------------------------------------- listing
def test_raw_dataset_ct_by_name_and_id(raw):
    make_raw_dataset(raw, "Dataset902_Foo", ["CT"], make=lambda c, ch: ct_volume(c))
    by_name = list_source_images("Dataset902_Foo")
    by_id = list_source_images("902")
    assert by_name == by_id
    assert [(s, c, ch, m) for _, s, c, ch, m in by_name] == [
        ("Dataset902_Foo", f"case_{i:03d}", 0, "CT") for i in range(3)]
    assert all(f.endswith("_0000.nii.gz") and os.path.isfile(f) for f, *_ in by_name)
    assert {m for *_, m in list_source_images("Dataset902_Foo:MRI")} == {"MRI"}
    # a raw dataset folder given as a path works too
    assert list_source_images(str(raw / "Dataset902_Foo")) == by_name


def test_raw_dataset_two_mri_channels(raw):
    make_raw_dataset(raw, "Dataset903_Brain", ["T1", "FLAIR"], n_cases=2)
    items = list_source_images("Dataset903_Brain")
    assert len(items) == 4
    assert [(c, ch, m) for _, _, c, ch, m in items] == [
        ("case_000", 0, "MRI"), ("case_000", 1, "MRI"), ("case_001", 0, "MRI"), ("case_001", 1, "MRI")]
    assert items[1][0].endswith("case_000_0001.nii.gz")
    assert {m for *_, m in list_source_images("Dataset903_Brain:ct")} == {"CT"}


def test_channel_name_ct_any_case(raw):
    make_raw_dataset(raw, "Dataset904_Mixed", ["ct", "T2"], n_cases=1)
    assert [m for *_, m in list_source_images("904")] == ["CT", "MRI"]


def test_folder_requires_suffix_and_reports_skipped(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "a.nii.gz", mri_volume())
    write_image(folder / "b.nrrd", mri_volume(1))
    (folder / "notes.txt").write_text("x")
    (folder / "preview.png").write_bytes(b"")
    with pytest.raises(SourceError) as e:
        list_source_images(str(folder))
    assert str(folder) in str(e.value) and ":CT" in str(e.value) and ":MRI" in str(e.value)
    with pytest.warns(UserWarning, match="notes.txt") as w:
        items = list_source_images(f"{folder}:MRI")
    assert "preview.png" in str(w[0].message)
    assert [(os.path.basename(f), s, c, ch, m) for f, s, c, ch, m in items] == [
        ("a.nii.gz", "imgs", "a", 0, "MRI"), ("b.nrrd", "imgs", "b", 0, "MRI")]


def test_unknown_and_empty_sources(tmp_path, raw):
    with pytest.raises(SourceError, match="nothere"):
        list_source_images(str(tmp_path / "nothere") + ":CT")
    with pytest.raises(SourceError, match="Dataset999_Nope"):
        list_source_images("Dataset999_Nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="empty"):
        list_source_images(f"{empty}:CT")


# --------------------------------------------------------------------------------------- preprocessing
def test_preprocess_ct_resample_clip_scale(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    write_image(folder / "c1.nii.gz", ct_volume())
    (v,) = preprocess_sources([f"{folder}:CT"], str(tmp_path / "cache"), num_processes=1, progress=False)
    assert isinstance(v, Volume)
    assert (v.modality, v.source, v.case, v.channel) == ("CT", "ct", "c1", 0)
    assert v.path == str(tmp_path / "cache" / "ct" / "c1_0000.npy")
    a = np.load(v.path, mmap_mode="r")
    assert a.dtype == np.float16 and tuple(a.shape) == v.shape
    assert all(abs(s - e) <= 1 for s, e in zip(v.shape, EXPECTED)), (v.shape, EXPECTED)
    a = np.asarray(a, dtype=np.float32)
    assert a.min() == 0.0 and a.max() == 1.0
    # voxel centres map to 1 mm indices (i + 0.5) * spacing - 0.5
    hot = tuple(int(round((i + 0.5) * s - 0.5)) for i, s in zip((5, 5, 5), SPACING))
    cold = tuple(int(round((i + 0.5) * s - 0.5)) for i, s in zip((24, 34, 14), SPACING))
    assert a[hot] == 1.0  # +3000 HU clipped to +1000
    assert a[cold] == 0.0  # -2000 HU clipped to -1000
    # 0 HU tissue far from the spikes lands in the middle of [-1000, 1000]
    assert abs(float(np.median(a[30:50, 10:30, 5:12])) - 0.5) < 0.01


def test_preprocess_mri_two_channels_float32(raw, tmp_path):
    make_raw_dataset(raw, "Dataset903_Brain", ["T1", "FLAIR"], n_cases=2)
    vols = preprocess_sources(["Dataset903_Brain"], str(tmp_path / "cache"), num_processes=1,
                              dtype=np.float32, progress=False)
    assert [(v.case, v.channel, v.modality) for v in vols] == [
        ("case_000", 0, "MRI"), ("case_000", 1, "MRI"), ("case_001", 0, "MRI"), ("case_001", 1, "MRI")]
    for v in vols:
        a = np.load(v.path)
        assert a.dtype == np.float32 and a.shape == v.shape
        assert a.min() == 0.0 and a.max() == 1.0
        assert os.path.basename(v.path) == f"{v.case}_{v.channel:04d}.npy"


def test_mri_clip_range(tmp_path):
    folder = tmp_path / "mr"
    folder.mkdir()
    a = np.full(SHAPE, 2000.0, np.float32)
    a[0:10] = 9000.0  # above 4000: clipped
    a[20:30] = -50.0  # below 0: clipped
    write_image(folder / "m.nii.gz", a)
    (v,) = preprocess_sources([f"{folder}:MRI"], str(tmp_path / "cache"), num_processes=1, progress=False)
    b = np.load(v.path).astype(np.float32)
    assert abs(float(np.median(b[25:35])) - 0.5) < 1e-3  # 2000 of [0, 4000]


def test_bad_images_name_the_file(tmp_path):
    cache = str(tmp_path / "cache")
    cases = {
        "four_d": sitk.GetImageFromArray(np.zeros((2, 6, 7, 8), np.float32)),
        "two_d": sitk.GetImageFromArray(np.zeros((7, 8), np.float32)),
        "nan": None,
    }
    for name, img in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        # NaN needs .nrrd / .mha: ITK's NIfTI reader turns NaN into 0 on reading
        f = folder / (f"{name}.nrrd" if img is None else f"{name}.nii.gz")
        if img is None:
            a = mri_volume()
            a[3, 4, 5] = np.nan
            write_image(f, a)
        else:
            sitk.WriteImage(img, str(f))
        with pytest.raises(SourceError) as e:
            preprocess_sources([f"{folder}:MRI"], cache, num_processes=1, progress=False)
        assert str(f) in str(e.value), (name, str(e.value))
        if name == "nan":
            assert "non-finite" in str(e.value)
        else:
            assert "shape" in str(e.value) or "3D" in str(e.value)


def test_constant_volume_warns_and_gives_zeros(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    write_image(folder / "f.nii.gz", np.full(SHAPE, 5000.0, np.float32))
    with pytest.warns(UserWarning, match="constant"):
        (v,) = preprocess_sources([f"{folder}:MRI"], str(tmp_path / "cache"), num_processes=1, progress=False)
    assert not np.load(v.path).any()


def test_cache_reuse_and_rebuild(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    src = write_image(folder / "c1.nii.gz", ct_volume())
    cache = str(tmp_path / "cache")
    kw = dict(num_processes=1, progress=False)
    (v,) = preprocess_sources([f"{folder}:CT"], cache, **kw)
    manifest = json.loads((tmp_path / "cache" / "ct" / "manifest.json").read_text())
    entry = manifest["volumes"]["c1_0000.npy"]
    assert entry["settings"]["clip"] == [-1000.0, 1000.0] and entry["settings"]["modality"] == "CT"
    assert entry["settings"]["source_file"] == src and entry["shape"] == list(v.shape)
    m0 = os.stat(v.path).st_mtime_ns
    first = np.load(v.path)

    (v2,) = preprocess_sources([f"{folder}:CT"], cache, **kw)  # nothing changed: re-used
    assert v2 == v and os.stat(v.path).st_mtime_ns == m0

    (v3,) = preprocess_sources([f"{folder}:CT"], cache, ct_clip=(-500.0, 500.0), **kw)  # setting changed
    assert os.stat(v.path).st_mtime_ns != m0
    assert not np.array_equal(np.load(v3.path), first)
    m1 = os.stat(v.path).st_mtime_ns
    (v4,) = preprocess_sources([f"{folder}:CT"], cache, ct_clip=(-500.0, 500.0), **kw)
    assert os.stat(v.path).st_mtime_ns == m1

    write_image(folder / "c1.nii.gz", ct_volume(seed=1))  # source changed (size / mtime)
    os.utime(src, ns=(m1 + 10**9, m1 + 10**9))
    preprocess_sources([f"{folder}:CT"], cache, ct_clip=(-500.0, 500.0), **kw)
    assert os.stat(v.path).st_mtime_ns != m1
    assert not [f for f in os.listdir(tmp_path / "cache" / "ct") if f.endswith(".tmp")]


def test_duplicate_source_names_rejected(tmp_path):
    for p in ("a/imgs", "b/imgs"):
        (tmp_path / p).mkdir(parents=True)
        write_image(tmp_path / p / "x.nii.gz", mri_volume())
    with pytest.raises(SourceError, match="imgs"):
        preprocess_sources([f"{tmp_path}/a/imgs:MRI", f"{tmp_path}/b/imgs:MRI"], str(tmp_path / "c"),
                           num_processes=1, progress=False)


# ----------------------------------------------------------------------------------------------- split
def fake_volumes():
    vols = []
    for c in range(10):  # brain MRI, 2 channels per case
        for ch in range(2):
            vols.append(Volume(f"/x/b{c}_{ch}.npy", (8, 8, 8), "MRI", "Brain", f"b{c}", ch))
    for c in range(5):
        vols.append(Volume(f"/x/l{c}.npy", (8, 8, 8), "CT", "Lung", f"l{c}", 0))
    vols.append(Volume("/x/h0.npy", (8, 8, 8), "MRI", "Heart", "h0", 0))
    return vols


def test_split_keeps_cases_whole_seeded_stratified():
    vols = fake_volumes()
    tr, va = split_train_val(vols, 0.2, seed=3)
    assert sorted(tr + va, key=vols.index) == vols
    assert [v for v in vols if v in tr] == tr and [v for v in vols if v in va] == va  # order kept
    tr_cases = {(v.source, v.case) for v in tr}
    va_cases = {(v.source, v.case) for v in va}
    assert not tr_cases & va_cases
    assert {v.modality for v in va} == {"CT", "MRI"}
    assert {v.modality for v in tr} == {"CT", "MRI"}
    assert split_train_val(vols, 0.2, seed=3) == (tr, va)
    assert any(split_train_val(vols, 0.2, seed=s)[1] != va for s in range(4, 10))
    # tiny fractions still validate every modality with >= 2 cases
    _, va_small = split_train_val(vols, 0.01, seed=0)
    assert {v.modality for v in va_small} == {"CT", "MRI"}
    # two cases: one each side; a single case: all training
    two = [vols[0], vols[1], vols[2]]
    tr2, va2 = split_train_val(two, 0.1, seed=0)
    assert len({v.case for v in va2}) == 1 and len({v.case for v in tr2}) == 1
    assert split_train_val(vols[:2], 0.1) == (vols[:2], [])
