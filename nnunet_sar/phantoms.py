"""Synthetic CT and MRI phantoms, written as nnU-Net raw datasets.

Why: the pre-training stage needs unlabeled sources of two modalities and the fine-tuning stage
needs a small labeled target, and the tests and the demo must run in seconds on a CPU without
downloading anything. These phantoms are crude but have what the method relies on: a body in air
(CT, Hounsfield units) or a head on a dark background (MRI, FLAIR-like scanner units), a few tissue
classes with realistic intensities and noise, and a tumor whose size falls into one of three strata.

Geometry lives in "body coordinates": the body is an ellipsoid filling ~75-85 % of each half-axis of
the volume, and the tumor is a blob whose radius is a fixed fraction of the body (in body units), so
tumor volume relative to the body is about 1.5 % (small), 5 % (medium) and 15 % (large) whatever
`shape` is. Everything is drawn from `np.random.default_rng(seed)`: the same seed gives the same
volume, different seeds move the anatomy and the tumor.

Axis order: `shape` and `spacing` are given in the order nnU-Net reports them, i.e. the numpy array
order of `sitk.GetArrayFromImage` (z, y, x). SimpleITK's own spacing is (x, y, z), so files are
written with `img.SetSpacing(tuple(spacing[::-1]))`; nnU-Net's SimpleITKIO then reads back exactly
`shape` and `spacing`.
"""
import os
import shutil

import numpy as np
import SimpleITK as sitk

TUMOR_SIZES = ("small", "medium", "large")
# Tumor radius in body units (body = unit ball): volume fraction ~ radius ** 3.
_TUMOR_RADIUS = {"small": 0.25, "medium": 0.37, "large": 0.53}
_CHANNEL = {"CT": "CT", "MRI": "FLAIR"}

CT_RANGE = (-1024.0, 3071.0)
CT_HU = {"air": -1000.0, "soft": 40.0, "fat": -100.0, "bone": 700.0, "lung": -850.0, "tumor": 120.0}
CT_NOISE = 20.0
MRI_VALUES = {"tissue_inner": 400.0, "tissue_outer": 600.0, "tumor": 1200.0}
MRI_NOISE = 30.0


def _modality(modality: str) -> str:
    """Normalise the modality name to 'CT' or 'MRI'."""
    m = str(modality).upper()
    if m not in _CHANNEL:
        raise ValueError(f"modality must be 'CT' or 'MRI', got {modality!r}")
    return m


def _ellipsoid(u, center, radii):
    """Squared normalised distance of each voxel to an ellipsoid (<= 1 means inside)."""
    return sum(((u[i] - center[i]) / radii[i]) ** 2 for i in range(3))


def _tumor_mask(rng, body_u, radius):
    """Irregular blob in body coordinates: a sphere whose radius varies smoothly with direction."""
    # Draw everything regardless of size so that the sizes differ only by scale for a given seed.
    waves = rng.normal(size=(3, 3)) * 2.0
    phases = rng.uniform(0, 2 * np.pi, size=3)
    amps = rng.uniform(0.04, 0.08, size=3)  # max perturbation 24 %
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    frac = rng.uniform()
    max_r = radius * (1 + amps.sum())
    center = direction * frac * max(0.85 - max_r, 0.0)  # keep the blob inside the body (fat rim at 0.9)
    d = np.stack([body_u[i] - center[i] for i in range(3)])
    dist = np.sqrt((d ** 2).sum(0))
    unit = d / np.maximum(dist, 1e-6)
    r = radius * (1 + sum(a * np.cos(np.tensordot(w, unit, axes=1) + p) for w, p, a in zip(waves, phases, amps)))
    return dist <= r


def make_phantom(modality: str, shape=(48, 48, 48), tumor_size: str | None = "medium", seed: int = 0,
                 tumor_contrast: float = 1.0, tumor_texture: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One volume: (image float32 of `shape`, label uint8 of `shape`, 1 = tumor).

    CT is in HU, clipped to [-1024, 3071]; MRI is FLAIR-like, >= 0, tumor hyperintense.
    `tumor_size` is one of TUMOR_SIZES or None (no tumor, label all 0).
    Harder targets: `tumor_contrast` scales the tumor's difference from the tissue around it (0.25: a
    quarter of it), `tumor_texture` adds voxel-wise heterogeneity inside the tumor with that standard
    deviation relative to the tissue's value (MRI) or 100 HU (CT), so that texture tells it apart more
    than the mean. The defaults give exactly the phantoms made before these options existed.
    """
    m = _modality(modality)
    if tumor_size is not None and tumor_size not in TUMOR_SIZES:
        raise ValueError(f"tumor_size must be one of {TUMOR_SIZES} or None, got {tumor_size!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {shape}")
    rng = np.random.default_rng(seed)

    # Normalised voxel coordinates in [-1, 1] along each axis, then body coordinates (body = unit ball).
    x = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    body_c = rng.uniform(-0.05, 0.05, size=3)
    body_r = rng.uniform(0.75, 0.85, size=3)
    u = [(x[i] - body_c[i]) / body_r[i] for i in range(3)]
    rho2 = _ellipsoid(u, (0, 0, 0), (1, 1, 1))
    body = rho2 <= 1.0
    tumor = _tumor_mask(rng, u, _TUMOR_RADIUS[tumor_size]) & body if tumor_size else np.zeros(shape, bool)

    if m == "CT":
        img = np.full(shape, CT_HU["air"], np.float32)
        img[body] = CT_HU["soft"]
        img[body & (rho2 > 0.9 ** 2)] = CT_HU["fat"]
        lung_r = rng.uniform((0.45, 0.3, 0.25), (0.6, 0.38, 0.3))  # tall along axis 0
        for side in (-1, 1):  # two lungs left and right along the last axis
            lung = _ellipsoid(u, (rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.0), side * 0.45), lung_r) <= 1
            img[lung & body] = CT_HU["lung"]
        bone_yx = (rng.uniform(0.5, 0.6), rng.uniform(-0.05, 0.05))  # spine-like cylinder along axis 0
        bone = ((u[1] - bone_yx[0]) ** 2 + (u[2] - bone_yx[1]) ** 2 <= rng.uniform(0.1, 0.14) ** 2) & body
        img[bone] = CT_HU["bone"]
        if tumor_contrast == 1.0:
            img[tumor] = CT_HU["tumor"]
        else:
            img[tumor] += tumor_contrast * (CT_HU["tumor"] - img[tumor])
        if tumor_texture:
            img[tumor] += 100.0 * tumor_texture * rng.standard_normal(int(tumor.sum())).astype(np.float32)
        img += rng.normal(0, CT_NOISE, shape).astype(np.float32)
        img = np.clip(img, *CT_RANGE)
    else:
        img = np.zeros(shape, np.float32)
        inner_r = rng.uniform(0.65, 0.8, size=3)
        img[body] = MRI_VALUES["tissue_outer"]
        img[body & (_ellipsoid(u, rng.uniform(-0.1, 0.1, size=3), inner_r) <= 1)] = MRI_VALUES["tissue_inner"]
        tumor_value = MRI_VALUES["tumor"] * rng.uniform(0.9, 1.1)
        if tumor_contrast == 1.0:
            img[tumor] = tumor_value
        else:
            img[tumor] += tumor_contrast * (tumor_value - img[tumor])
        if tumor_texture:
            img[tumor] *= 1 + tumor_texture * rng.standard_normal(int(tumor.sum())).astype(np.float32)
        coef = rng.uniform(-0.12, 0.12, size=(2, 3))  # smooth multiplicative bias field in [0.7, 1.3]
        bias = 1 + sum(coef[0, i] * x[i] + coef[1, i] * x[i] ** 2 for i in range(3))
        img *= np.clip(bias, 0.7, 1.3)
        noise = rng.normal(0, MRI_NOISE, (2,) + shape)
        img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # Rician: magnitude of complex signal
    return img.astype(np.float32), tumor.astype(np.uint8)


def _case_seed(seed: int, split: int, index: int) -> int:
    """Independent seed per (dataset seed, split, case index)."""
    return int(np.random.SeedSequence([seed, split, index]).generate_state(1)[0])


def _write(arr: np.ndarray, path: str, spacing) -> None:
    """Write an array in nnU-Net's axis order with nnU-Net-order spacing."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, path, useCompression=True)


def write_phantom_dataset(nnunet_raw: str, dataset_id: int, name: str, modality: str, num_training: int,
                          num_test: int = 0, shape=(48, 48, 48), spacing=(1.0, 1.0, 1.0), seed: int = 0,
                          overwrite: bool = False, tumor_contrast: float = 1.0, tumor_texture: float = 0.0) -> str:
    """Writes nnunet_raw/DatasetXXX_name (imagesTr/labelsTr, imagesTs/labelsTs when num_test > 0, dataset.json); returns its folder.

    Cases are `case_000`, `case_001`, ... (test cases continue the numbering); tumor sizes cycle
    small/medium/large. `shape` and `spacing` are in nnU-Net's (numpy array) axis order. An existing
    non-empty folder raises FileExistsError unless `overwrite=True`, which replaces it.
    `tumor_contrast` and `tumor_texture` as in ``make_phantom``.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    m = _modality(modality)
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id}")
    if num_training < 1 or num_test < 0:
        raise ValueError(f"need num_training >= 1 and num_test >= 0, got {num_training}, {num_test}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    folder = os.path.join(nnunet_raw, f"Dataset{int(dataset_id):03d}_{name}")
    if os.path.isdir(folder) and os.listdir(folder):
        if not overwrite:
            raise FileExistsError(f"dataset folder exists and is not empty: {folder}")
        shutil.rmtree(folder)

    splits = [("Tr", 0, range(num_training))]
    if num_test > 0:
        splits.append(("Ts", 1, range(num_test)))
    for suffix, split, indices in splits:
        os.makedirs(os.path.join(folder, "images" + suffix), exist_ok=True)
        os.makedirs(os.path.join(folder, "labels" + suffix), exist_ok=True)
        for i in indices:
            case = f"case_{i + split * num_training:03d}"
            img, seg = make_phantom(m, shape, TUMOR_SIZES[i % 3], _case_seed(seed, split, i), tumor_contrast,
                                    tumor_texture)
            _write(img, os.path.join(folder, "images" + suffix, f"{case}_0000.nii.gz"), spacing)
            _write(seg, os.path.join(folder, "labels" + suffix, f"{case}.nii.gz"), spacing)

    generate_dataset_json(folder, {"0": _CHANNEL[m]}, {"background": 0, "tumor": 1}, num_training, ".nii.gz",
                          dataset_name=os.path.basename(folder),
                          description=f"nnunet-sar synthetic {m} phantoms, seed {seed}",
                          license="CC0 (synthetic)", converted_by="nnunet_sar.phantoms")
    return folder
