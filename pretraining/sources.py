"""Pre-training sources and their one-time preprocessing (SAR paper, section 3.1).

A *source* is given on the command line as ``SRC[:CT|:MRI]`` where ``SRC`` is

- an nnU-Net raw dataset: a name (``Dataset902_Foo``) or an integer id resolved under env ``nnUNet_raw``,
  or the path of a raw dataset folder (a folder holding ``dataset.json`` and ``imagesTr/``). Each channel
  file of each training case is its own volume (BraTS's 4 sequences give 4 volumes per case). The modality
  of a channel comes from ``dataset.json``'s ``channel_names``: "CT" (any case) -> CT, anything else ->
  MRI, the same rule nnU-Net's normalisation uses. A ``:CT`` / ``:MRI`` suffix overrides it for all
  channels.
- a plain folder of image files. It carries no channel names, so the suffix is required. Every file whose
  ending a 3D nnU-Net reader supports (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.gipl``, ``.tif``,
  ``.tiff``, plus ``.mhd`` read through SimpleITK, e.g. LUNA16) is one volume with case = file name
  without ending and channel 0. Other files are skipped and listed in one warning (``.raw`` / ``.zraw``
  data files of an ``.mhd`` header are skipped silently). Sub-folders are not searched.

Preprocessing of each volume (done once, cached):
read with nnU-Net's reader-writer for the file ending -> check 3D single channel and finite -> resample to
``spacing`` (1 mm isotropic) with nnU-Net's ``resample_data_or_seg_to_shape`` (3rd-order spline, no
separate z) -> clip (CT [-1000, 1000] HU, MRI [0, 4000]; after resampling, as the spline overshoots) ->
scale to [0, 1] by the volume's own min / max (a constant volume becomes zeros, with a warning) -> save
as ``.npy`` (float16 by default: half the disk and I/O, ~3 significant digits, i.e. about 0.5 HU of the
2000 HU CT window; pass ``dtype=np.float32`` for exact values) so training can memory-map it.

Cache layout: ``cache_dir/<source>/{case}_{channel:04d}.npy`` plus ``cache_dir/<source>/manifest.json``
holding, per volume, the settings (spacing, clip range, modality, dtype, resampling) and the source
file's path, size and mtime. An existing ``.npy`` is re-used when its entry matches, rebuilt otherwise.
All files are written to a temporary name and moved into place with ``os.replace``.
With several processes (e.g. DDP ranks) let one rank preprocess and the others call again after a
barrier: they then only read the manifest.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
import warnings
from copy import deepcopy
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from nnunet_sar import SARError, one_line
from nnunet_sar.files import atomic_write

__all__ = [
    "Volume",
    "SourceError",
    "MODALITIES",
    "VOLUME_FILE_ENDINGS",
    "parse_source",
    "list_source_images",
    "preprocess_sources",
    "preprocess_volume",
    "split_train_val",
]

MODALITIES = ("CT", "MRI")
MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = 1
RESAMPLING = "nnunetv2.resample_data_or_seg_to_shape(is_seg=False, order=3, order_z=3, force_separate_z=False)"


@dataclass(frozen=True)
class Volume:
    """One single-channel, preprocessed volume (values in [0, 1], ``spacing`` mm isotropic)."""

    path: str  # .npy file (float16 or float32); open with np.load(path, mmap_mode="r")
    shape: tuple  # (x, y, z) after preprocessing, nnU-Net's array axis order
    modality: str  # "CT" or "MRI"
    source: str  # source name (dataset name or folder name)
    case: str  # case identifier; all channels of a case share it
    channel: int


class SourceError(SARError, ValueError):
    """A source, file, key or value that cannot be used; the message names it."""



# --------------------------------------------------------------------------------------------- listing
def _io_classes():
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    return [rw for rw in LIST_OF_IO_CLASSES if rw is not NaturalImage2DIO]


def _volume_file_endings() -> tuple[str, ...]:
    endings = {".mhd"}  # SimpleITK reads MetaImage headers; nnU-Net's SimpleITKIO does not list it
    for rw in _io_classes():  # 3D-capable readers only (.png / .bmp are 2D)
        endings.update(e.lower() for e in rw.supported_file_endings)
    return tuple(sorted(endings, key=lambda e: (-len(e), e)))  # longest first: .nii.gz before .nii


VOLUME_FILE_ENDINGS = _volume_file_endings()
_COMPANION_ENDINGS = (".raw", ".zraw")  # data files of .mhd headers


def _file_ending(fname: str) -> str | None:
    low = fname.lower()
    for e in VOLUME_FILE_ENDINGS:
        if low.endswith(e) and len(fname) > len(e):
            return e
    return None


def parse_source(spec: str) -> tuple[str, str | None]:
    """``"SRC[:CT|:MRI]"`` -> ``(SRC, "CT" | "MRI" | None)``; the suffix is case-insensitive.

    Text after the last ':' that is not CT/MRI belongs to the path only if the whole spec is an existing
    path; otherwise it is an unknown modality (SourceError).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(f"empty source specification {spec!r}; expected SRC[:CT|:MRI]")
    spec = spec.strip()
    if ":" in spec:
        src, suffix = spec.rsplit(":", 1)
        mod = suffix.strip().upper()
        if mod in MODALITIES:
            # a path that literally ends in ':CT' wins only when the stripped one does not exist
            if os.path.exists(spec) and not os.path.exists(src):
                return spec, None
            if not src:
                raise SourceError(f"source specification {spec!r} has a modality but no source")
            return src, mod
        if os.path.exists(spec):
            return spec, None
        raise SourceError(
            f"unknown modality {suffix!r} in source specification {spec!r}: use :CT or :MRI "
            f"(and {spec!r} is not an existing path)"
        )
    return spec, None


def _modality_from_channel_name(name: str) -> str:
    return "CT" if str(name).strip().casefold() == "ct" else "MRI"


def _resolve_raw_dataset(src: str) -> str | None:
    """Folder of the nnU-Net raw dataset ``src`` (name, id or path), or None if ``src`` is not one."""
    if os.path.isdir(src):
        if os.path.isfile(os.path.join(src, "dataset.json")) and os.path.isdir(os.path.join(src, "imagesTr")):
            return os.path.abspath(src)
        return None
    if not (src.startswith("Dataset") or re.fullmatch(r"\d+", src)):
        return None
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise SourceError(f"source {src!r} looks like an nnU-Net dataset, but env nnUNet_raw is not set")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(src)
    except (RuntimeError, ValueError) as e:
        raise SourceError(f"source {src!r}: no such nnU-Net raw dataset under nnUNet_raw={raw} "
                          f"({one_line(e)})") from None
    folder = os.path.join(raw, name)
    if not os.path.isdir(folder):
        raise SourceError(f"source {src!r}: raw dataset folder {folder} does not exist (nnUNet_raw={raw})")
    return os.path.abspath(folder)


def _list_raw_dataset(folder: str, override: str | None) -> list[tuple[str, str, str, int, str]]:
    from nnunetv2.utilities.utils import (
        create_paths_fn,
        get_filenames_of_train_images_and_targets,
        get_identifiers_from_splitted_dataset_folder,
    )

    djfile = os.path.join(folder, "dataset.json")
    try:
        with open(djfile) as f:
            dj = json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read {djfile}: {one_line(e)}") from None
    channel_names = dj.get("channel_names", dj.get("modality"))
    if not isinstance(channel_names, dict) or not channel_names:
        raise SourceError(f"{djfile}: key 'channel_names' missing or empty")
    try:
        channels = sorted((int(k), v) for k, v in channel_names.items())
    except (TypeError, ValueError):
        raise SourceError(f"{djfile}: key 'channel_names' must map channel indices to names, "
                          f"got {channel_names!r}") from None
    if [c for c, _ in channels] != list(range(len(channels))):
        raise SourceError(f"{djfile}: 'channel_names' keys {sorted(channel_names)} are not 0..{len(channels) - 1}")
    if "file_ending" not in dj:
        raise SourceError(f"{djfile}: key 'file_ending' missing")
    fe = dj["file_ending"]

    if "dataset" in dj:
        cases = get_filenames_of_train_images_and_targets(folder, deepcopy(dj))
        cases = {k: v["images"] for k, v in cases.items()}
    else:
        # same as get_filenames_of_train_images_and_targets, without its 12-process pool
        images_tr = os.path.join(folder, "imagesTr")
        ids = get_identifiers_from_splitted_dataset_folder(images_tr, fe)
        files = sorted(f for f in os.listdir(images_tr) if f.endswith(fe))
        cases = {str(i): create_paths_fn(images_tr, files, fe, i) for i in ids}

    name = os.path.basename(os.path.normpath(folder))
    out = []
    for case in sorted(cases):
        imgs = cases[case]
        if len(imgs) != len(channels):
            raise SourceError(
                f"source {name}: case {case!r} has {len(imgs)} image file(s) {[os.path.basename(i) for i in imgs]} "
                f"but dataset.json declares {len(channels)} channel(s) {channel_names}"
            )
        for (c, cname), img in zip(channels, imgs):
            out.append((img, name, case, c, override or _modality_from_channel_name(cname)))
    return out


def _list_folder(folder: str, override: str | None, spec: str) -> list[tuple[str, str, str, int, str]]:
    if override is None:
        raise SourceError(
            f"folder {folder} has no channel names to tell its modality: add :CT or :MRI "
            f"(e.g. '{spec}:CT' or '{spec}:MRI')"
        )
    name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    entries = sorted(os.listdir(folder))
    files = [f for f in entries if os.path.isfile(os.path.join(folder, f))]
    mhd_stems = {f[:-4].lower() for f in files if f.lower().endswith(".mhd")}
    out, skipped, seen = [], [], {}
    for f in files:
        e = _file_ending(f)
        if e is None:
            stem, ext = os.path.splitext(f)
            if ext.lower() in _COMPANION_ENDINGS and stem.lower() in mhd_stems:
                continue
            skipped.append(f)
            continue
        case = f[: -len(e)]
        if case in seen:
            raise SourceError(f"folder {folder}: files {seen[case]!r} and {f!r} give the same case {case!r}")
        seen[case] = f
        out.append((os.path.abspath(os.path.join(folder, f)), name, case, 0, override))
    if skipped:
        warnings.warn(
            f"source {name} ({folder}): skipped {len(skipped)} file(s) with no supported 3D image ending "
            f"{list(VOLUME_FILE_ENDINGS)}: {skipped}",
            stacklevel=3,
        )
    return out


def list_source_images(spec: str) -> list[tuple[str, str, str, int, str]]:
    """All volumes of one source: ``(image_file, source, case, channel, modality)`` tuples, sorted by case."""
    src, override = parse_source(spec)
    raw = _resolve_raw_dataset(src)
    if raw is not None:
        items = _list_raw_dataset(raw, override)
    elif os.path.isdir(src):
        items = _list_folder(src, override, src)
    else:
        raise SourceError(
            f"source {src!r} is neither an nnU-Net raw dataset (name, id or folder with dataset.json and imagesTr) "
            f"nor an existing folder of images"
        )
    if not items:
        raise SourceError(f"source {spec!r} contains no images")
    return items


# --------------------------------------------------------------------------------------- preprocessing
def _read_volume(image_file: str) -> tuple[np.ndarray, list]:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.imageio.tif_reader_writer import Tiff3DIO

    ending = _file_ending(os.path.basename(image_file))
    try:
        if ending == ".mhd":
            rw = SimpleITKIO
        else:
            rw = determine_reader_writer_from_file_ending(ending or os.path.splitext(image_file)[1], verbose=False)
            if rw is NaturalImage2DIO:  # .tif: we want volumes
                rw = Tiff3DIO
        data, props = rw().read_images((image_file,))
    except Exception as e:  # noqa: BLE001 - readers raise anything from AssertionError to RuntimeError
        raise SourceError(f"cannot read {image_file} as a 3D image: {type(e).__name__}: {one_line(e)}") from None
    data = np.asarray(data)
    if data.ndim != 4 or data.shape[0] != 1 or min(data.shape[1:]) < 2:
        raise SourceError(
            f"{image_file}: expected a 3D single-channel image, got array shape {tuple(data.shape)} "
            f"(channels, x, y, z as nnU-Net reads it)"
        )
    return data, [float(s) for s in props["spacing"]]


def preprocess_volume(image_file: str, modality: str, spacing=(1.0, 1.0, 1.0), clip=(-1000.0, 1000.0)
                      ) -> tuple[np.ndarray, list[str]]:
    """Read, resample, clip and scale one image; returns (float32 (x, y, z) array in [0, 1], warnings)."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )

    msgs = []
    data, old_spacing = _read_volume(image_file)
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        n = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise SourceError(f"{image_file}: {n} non-finite voxel(s) (NaN / inf)")
    new_shape = np.maximum(compute_new_shape(data.shape[1:], old_spacing, list(spacing)), 1)
    data = resample_data_or_seg_to_shape(data, new_shape, old_spacing, list(spacing), is_seg=False, order=3,
                                         order_z=3, force_separate_z=False)[0]
    data = np.clip(data.astype(np.float32, copy=False), clip[0], clip[1])
    lo, hi = float(data.min()), float(data.max())
    if not hi > lo:
        msgs.append(f"{image_file} ({modality}) is constant ({lo}) after clipping to {list(clip)}: saved as zeros")
        data = np.zeros(data.shape, np.float32)
    else:
        data = np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)
    return data, msgs


def _atomic_write_bytes(path: str, writer) -> None:
    atomic_write(path, writer, error=SourceError)


def _save_npy_atomic(path: str, arr: np.ndarray) -> None:
    _atomic_write_bytes(path, lambda f: np.save(f, arr, allow_pickle=False))


def _save_json_atomic(path: str, obj) -> None:
    _atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def _build_job(job: dict) -> tuple[str, str, list[int], list[str]]:
    """Worker: preprocess one volume and write its .npy; returns (source, key, shape, warnings)."""
    data, msgs = preprocess_volume(job["image_file"], job["modality"], job["spacing"], job["clip"])
    _save_npy_atomic(job["npy"], data.astype(job["dtype"]))
    return job["source"], job["key"], [int(s) for s in data.shape], msgs


def _makedirs(folder: str, what: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SourceError(f"cannot create the {what} {folder}: {e.strerror or one_line(e)}") from None


def _load_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            m = json.load(f)
        if isinstance(m, dict) and isinstance(m.get("volumes"), dict):
            return m["volumes"]
    except (OSError, ValueError):
        pass
    return {}


def _npy_shape(path: str):
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError):
        return None


WINDOWS = {"CT": (-1000.0, 1000.0), "MRI": (0.0, 4000.0)}  # the clip windows, scaled to [0, 1] in the cache


def preprocess_sources(specs: Iterable[str], cache_dir: str, num_processes: int = 2, spacing=(1.0, 1.0, 1.0),
                       ct_clip=WINDOWS["CT"], mri_clip=WINDOWS["MRI"], *, dtype=np.float16,
                       progress: bool = True) -> list[Volume]:
    """Preprocess (or re-use from ``cache_dir``) every volume of ``specs``; returns them in listing order.

    ``num_processes`` workers (spawned, like nnU-Net's preprocessing); 1 runs in this process.
    Warnings (skipped files, constant volumes) are emitted here with ``warnings.warn``.
    """
    if isinstance(specs, str):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise SourceError("no sources given")
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise SourceError(f"spacing must be 3 positive numbers, got {spacing}")
    clips = {"CT": [float(ct_clip[0]), float(ct_clip[1])], "MRI": [float(mri_clip[0]), float(mri_clip[1])]}
    for m, c in clips.items():
        if not c[1] > c[0]:
            raise SourceError(f"{m} clip range {c} is empty")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise SourceError(f"dtype must be float16 or float32, got {dtype}")

    items, names = [], {}
    for spec in specs:
        listed = list_source_images(spec)
        name = listed[0][1]
        if name in names:
            raise SourceError(
                f"two sources share the name {name!r} ({names[name]!r} and {spec!r}); their cache folders would "
                f"collide: give each source once, and rename one of two folders with the same name"
            )
        names[name] = spec
        items.extend(listed)

    _makedirs(cache_dir, "cache folder (--cache-dir, default $nnUNet_preprocessed/nnUNetSAR_sources)")
    manifests: dict[str, dict] = {}
    volumes, jobs = [], []
    for image_file, source, case, channel, modality in items:
        sdir = os.path.join(cache_dir, source)
        if source not in manifests:
            _makedirs(sdir, f"cache folder of source {source}")
            manifests[source] = _load_manifest(os.path.join(sdir, MANIFEST_NAME))
        key = f"{case}_{channel:04d}.npy"
        npy = os.path.abspath(os.path.join(sdir, key))
        try:
            st = os.stat(image_file)
        except OSError as e:
            raise SourceError(f"source {source}: image file {image_file} (case {case!r}, channel {channel}) cannot "
                              f"be read: {e.strerror}") from None
        settings = {
            "format": CACHE_FORMAT,
            "spacing": spacing,
            "clip": clips[modality],
            "modality": modality,
            "dtype": dtype.name,
            "resampling": RESAMPLING,
            "source_file": os.path.abspath(image_file),
            "source_size": int(st.st_size),
            "source_mtime_ns": int(st.st_mtime_ns),
        }
        entry = manifests[source].get(key)
        reuse = (
            isinstance(entry, dict)
            and entry.get("settings") == settings
            and os.path.isfile(npy)
            and _npy_shape(npy) == tuple(entry.get("shape", ()))
        )
        volumes.append([npy, tuple(entry["shape"]) if reuse else None, modality, source, case, channel])
        if not reuse:
            manifests[source].pop(key, None)
            jobs.append({"image_file": image_file, "modality": modality, "spacing": spacing,
                         "clip": clips[modality], "dtype": dtype.name, "npy": npy, "source": source,
                         "key": key, "settings": settings, "index": len(volumes) - 1})

    def write_manifests(sources):
        for s in sources:
            _save_json_atomic(os.path.join(cache_dir, s, MANIFEST_NAME),
                              {"format": CACHE_FORMAT, "volumes": manifests[s]})

    if jobs:
        from tqdm import tqdm

        by_key = {(j["source"], j["key"]): j for j in jobs}
        dirty, last_write = set(), time.monotonic()
        bar = tqdm(total=len(jobs), desc=f"SAR preprocessing ({len(items) - len(jobs)} cached)",
                   unit="vol", disable=not progress)
        pool = None
        try:
            if num_processes > 1 and len(jobs) > 1:
                pool = multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs)))
                results = pool.imap_unordered(_build_job, jobs)
            else:
                results = map(_build_job, jobs)
            for source, key, shape, msgs in results:
                job = by_key[(source, key)]
                manifests[source][key] = {"settings": job["settings"], "shape": shape}
                volumes[job["index"]][1] = tuple(shape)
                for m in msgs:
                    warnings.warn(m, stacklevel=2)
                dirty.add(source)
                bar.update(1)
                if time.monotonic() - last_write > 10:
                    write_manifests(dirty)
                    dirty, last_write = set(), time.monotonic()
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
            write_manifests(dirty)  # what finished is kept even when a later volume failed

    return [Volume(path=p, shape=tuple(int(x) for x in sh), modality=m, source=s, case=c, channel=ch)
            for p, sh, m, s, c, ch in volumes]


# ----------------------------------------------------------------------------------------------- split
def split_train_val(volumes: list[Volume], val_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[list[Volume], list[Volume]]:
    """Split by (source, case), seeded, stratified by modality; both lists keep the input order.

    - all channels of a case land on the same side;
    - with >= 2 cases at least one case goes to validation (unless ``val_fraction == 0``);
    - a modality with >= 2 cases gets round(val_fraction * n) cases, at least 1 and at most n - 1, in
      validation, so it is present on both sides; a modality with a single case stays in training unless
      it is needed to give validation anything at all.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, v in enumerate(volumes):
        groups.setdefault((v.source, v.case), []).append(i)
    keys = list(groups)
    if len(keys) < 2 or val_fraction == 0.0:
        return list(volumes), []
    rng = np.random.default_rng(seed)
    strata: dict[str, list[tuple[str, str]]] = {}
    for k in keys:
        mods = "+".join(sorted({volumes[i].modality for i in groups[k]}))
        strata.setdefault(mods, []).append(k)
    val: set = set()
    for mods in sorted(strata):
        members = strata[mods]
        n = len(members)
        if n < 2:
            continue
        n_val = min(max(1, int(round(val_fraction * n))), n - 1)
        for j in rng.permutation(n)[:n_val]:
            val.add(members[j])
    if not val:  # every modality has a single case: still validate on one
        largest = max(len(m) for m in strata.values())
        pool = [k for mods in sorted(strata) for k in strata[mods] if len(strata[mods]) == largest]
        val.add(pool[int(rng.integers(len(pool)))])
    train_v = [v for v in volumes if (v.source, v.case) not in val]
    val_v = [v for v in volumes if (v.source, v.case) in val]
    return train_v, val_v
