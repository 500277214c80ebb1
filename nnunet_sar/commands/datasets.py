"""The paper's datasets as nnU-Net raw datasets, and its train / test split.

- ``nnunet_sar_convert_brats2018 -i MICCAI_BraTS_2018_Data_Training -d 501``: the downstream task of
  paper 3.2.1: FLAIR only (``<case>_flair.nii.gz`` -> ``_0000``, channel name FLAIR) and the whole tumor
  (``label = seg > 0``; labels background 0, tumor 1).
- ``nnunet_sar_convert_brats2018 -i ... -d 504 --as-source --exclude-from splits_final.json``: BraTS as
  a pre-training source (3.1): all four sequences (t1, t1ce, t2, flair -> ``_0000.._0003``, channel
  names T1, T1ce, T2, FLAIR), images only, without the downstream test cases.
- ``nnunet_sar_convert_source -i FOLDER -d ID -n NAME -m CT|MRI``: LUNA16 (``*.mhd`` + ``.raw``, also
  in ``subset*/`` folders; ``--subsets``, default 0-6: the paper's 623 scans), LiTS2017 (``volume-*.nii``)
  or an MSD task folder (``imagesTr/`` and ``imagesTs/*.nii.gz``, e.g. Task02_Heart: the paper's 30 cases)
  -> a raw dataset of images only (``imagesTr``), one channel named CT or MRI; prints the case count.
- ``nnunet_sar_split -d 501``: the random 2 : 1 train / test split of 3.2.1 as nnU-Net's
  ``splits_final.json``: fold 0 trains on the training two thirds and validates on the held-out test third.
  MSD Pancreas (3.2.2) uses nnU-Net's own 5-fold cross-validation: nothing to write.

Every command checks its input first and stops with one line that names what is missing.
"""
import argparse
import json
import os
import re
import shutil
from os.path import isdir, isfile, join

import numpy as np

from nnunet_sar import SARError, console_main, nnunet_folder, one_line

BRATS_SEQUENCES = ("t1", "t1ce", "t2", "flair")
BRATS_CHANNEL_NAMES = ("T1", "T1ce", "T2", "FLAIR")
BRATS_GRADES = ("HGG", "LGG")


# ------------------------------------------------------------------------------------------ helpers
def _raw_root() -> str:
    return nnunet_folder("nnUNet_raw")


def _raw_dataset_folder(dataset_id: int, name: str, overwrite: bool) -> str:
    """$nnUNet_raw/DatasetXXX_NAME, new (or emptied with overwrite); refuses an id already taken by another name."""
    if not 1 <= int(dataset_id) <= 999:
        raise SARError(f"dataset id must be 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise SARError(f"dataset name {name!r} may contain only letters, digits, '_' and '-'")
    root = _raw_root()
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    if isdir(root):
        for other in os.listdir(root):
            if other.startswith(f"Dataset{int(dataset_id):03d}_") and other != folder_name:
                raise SARError(f"dataset id {dataset_id} is already used by {join(root, other)}; choose another -d")
    folder = join(root, folder_name)
    if isdir(folder) and os.listdir(folder):
        if not overwrite:
            raise SARError(f"{folder} exists already; remove it or pass --overwrite")
        shutil.rmtree(folder)
    os.makedirs(join(folder, "imagesTr"), exist_ok=True)
    return folder


def _write_dataset_json(folder: str, channel_names, labels: dict, n: int, file_ending: str, description: str):
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    generate_dataset_json(folder, {str(i): c for i, c in enumerate(channel_names)}, labels, n, file_ending,
                          dataset_name=os.path.basename(folder), description=description)


def _run(main_function, argv, prog: str):
    """Console-script wrapper (``console_main``): a SARError becomes one line on stderr, exit code 2."""
    console_main(prog)(main_function)(argv)


def _short_list(items, n=5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _check_headers(files, hint: str = "") -> None:
    """Every file a 3D single-channel image, read before anything is written (or an old dataset removed by
    --overwrite): a SARError names the first that is not."""
    import SimpleITK as sitk
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise SARError(f"cannot read {f}: {one_line(e)[-200:]}") from None
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            raise SARError(f"{f} is not a 3D single-channel image ({reader.GetDimension()}D, "
                           f"{reader.GetNumberOfComponents()} components){hint}")


# ------------------------------------------------------------------------------------------ BraTS 2018
def find_brats2018_cases(folder: str, sequences=BRATS_SEQUENCES, need_seg: bool = True) -> dict:
    """``{case: {sequence or 'seg': file}}`` of a BraTS 2018 training folder (``HGG/`` and ``LGG/`` with
    ``<case>/<case>_<seq>.nii.gz``), or a SARError naming what is missing."""
    if not isdir(folder):
        raise SARError(f"BraTS folder {folder} does not exist")
    grades = [g for g in BRATS_GRADES if isdir(join(folder, g))]
    if not grades:
        raise SARError(f"BraTS folder {folder} has neither HGG/ nor LGG/ (expected the BraTS 2018 training "
                       f"folder, e.g. MICCAI_BraTS_2018_Data_Training)")
    wanted = list(sequences) + (["seg"] if need_seg else [])
    cases, missing = {}, []
    for g in grades:
        for case in sorted(os.listdir(join(folder, g))):
            cdir = join(folder, g, case)
            if not isdir(cdir) or case.startswith("."):
                continue
            files = {s: join(cdir, f"{case}_{s}.nii.gz") for s in wanted}
            missing += [join(g, case, os.path.basename(f)) for f in files.values() if not isfile(f)]
            cases[case] = files
    if missing:
        raise SARError(f"BraTS folder {folder} lacks {len(missing)} file(s): {_short_list(missing)}")
    if not cases:
        raise SARError(f"BraTS folder {folder}: no case folders in {' or '.join(g + '/' for g in grades)}")
    return cases


def read_excluded_cases(exclude=(), exclude_from=None) -> set:
    """Case ids to leave out: given ones plus every 'val' case of an nnU-Net splits_final.json."""
    out = set(exclude or ())
    if exclude_from:
        try:
            with open(exclude_from) as f:
                splits = json.load(f)
            out |= {c for s in splits for c in s["val"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SARError(f"cannot read the held-out cases ('val' of each split) from {exclude_from}: "
                           f"{type(e).__name__}: {e}") from None
    return out


def convert_brats2018(folder: str, dataset_id: int, name: str | None = None, as_source: bool = False,
                      exclude=(), exclude_from=None, overwrite: bool = False) -> str:
    """BraTS 2018 training data -> nnU-Net raw dataset; returns its folder. See the module docstring."""
    import SimpleITK as sitk
    cases = find_brats2018_cases(folder, need_seg=not as_source)
    excluded = read_excluded_cases(exclude, exclude_from)
    unknown = sorted(excluded - set(cases))
    if unknown:
        raise SARError(f"{len(unknown)} excluded case(s) are not in {folder}: {_short_list(unknown)}")
    keep = [c for c in sorted(cases) if c not in excluded]
    if not keep:
        raise SARError(f"no BraTS cases left after excluding {len(excluded)}")
    name = name or ("BraTS2018src" if as_source else "BraTS2018FLAIR")
    _check_headers([cases[c][s] for c in keep for s in (BRATS_SEQUENCES if as_source else ("flair", "seg"))])
    out = _raw_dataset_folder(dataset_id, name, overwrite)
    images = join(out, "imagesTr")
    if as_source:
        for c in keep:
            for i, s in enumerate(BRATS_SEQUENCES):
                shutil.copyfile(cases[c][s], join(images, f"{c}_{i:04d}.nii.gz"))
        _write_dataset_json(out, BRATS_CHANNEL_NAMES, {"background": 0}, len(keep), ".nii.gz",
                            "BraTS 2018 training images (T1, T1ce, T2, FLAIR), unlabeled pre-training source"
                            + (f"; {len(excluded)} held-out cases excluded" if excluded else ""))
    else:
        labels = join(out, "labelsTr")
        os.makedirs(labels, exist_ok=True)
        for c in keep:
            shutil.copyfile(cases[c]["flair"], join(images, f"{c}_0000.nii.gz"))
            seg = sitk.ReadImage(cases[c]["seg"])
            tumor = sitk.GetImageFromArray((sitk.GetArrayFromImage(seg) > 0).astype(np.uint8))
            tumor.CopyInformation(seg)
            sitk.WriteImage(tumor, join(labels, f"{c}.nii.gz"), useCompression=True)
        _write_dataset_json(out, ("FLAIR",), {"background": 0, "tumor": 1}, len(keep), ".nii.gz",
                            "BraTS 2018 training set, FLAIR only, whole tumor (seg > 0)")
    return out


def main_convert_brats2018(argv=None):
    p = argparse.ArgumentParser(
        prog="nnunet_sar_convert_brats2018",
        description="BraTS 2018 training folder (HGG/, LGG/) -> nnU-Net raw dataset: FLAIR + whole tumor "
                    "(paper 3.2.1), or with --as-source all four sequences without labels for pre-training.")
    p.add_argument("-i", required=True, help="BraTS 2018 training folder holding HGG/ and LGG/")
    p.add_argument("-d", required=True, type=int, help="nnU-Net dataset id of the new raw dataset")
    p.add_argument("-n", default=None, help="dataset name (default BraTS2018FLAIR, or BraTS2018src with --as-source)")
    p.add_argument("--as-source", action="store_true", help="pre-training source: T1, T1ce, T2, FLAIR; no labels")
    p.add_argument("--exclude", nargs="+", default=(), metavar="CASE", help="cases to leave out")
    p.add_argument("--exclude-from", default=None, metavar="SPLITS_JSON",
                   help="leave out every 'val' case of this splits_final.json (the downstream test cases)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")

    def run(argv):
        a = p.parse_args(argv)
        out = convert_brats2018(a.i, a.d, a.n, a.as_source, a.exclude, a.exclude_from, a.overwrite)
        print(f"wrote {out}")
    _run(run, argv, "nnunet_sar_convert_brats2018")


# --------------------------------------------------------------------------- LUNA16, LiTS, MSD Heart
LUNA16_SUBSETS = tuple(range(7))  # subsets 0-6: the paper's 623 LUNA16 scans (Table 1), as Models Genesis'


def find_source_images(folder: str, subsets=LUNA16_SUBSETS) -> tuple[str, list[str]]:
    """(layout, image files) of a pre-training source folder: an MSD task (``imagesTr`` and ``imagesTs``
    ``/*.nii.gz``: unlabeled, the test images count too), LiTS (``volume-*.nii`` anywhere below) or LUNA16
    (``*.mhd`` anywhere below, each with its data file; in ``subsetN/`` folders only the given ``subsets``)."""
    if not isdir(folder):
        raise SARError(f"source folder {folder} does not exist")
    if isdir(join(folder, "imagesTr")):
        files = sorted(join(folder, part, f) for part in ("imagesTr", "imagesTs") if isdir(join(folder, part))
                       for f in os.listdir(join(folder, part))
                       if f.endswith(".nii.gz") and not f.startswith("."))  # MSD ships '._*' resource forks
        if not files:
            raise SARError(f"{join(folder, 'imagesTr')} holds no .nii.gz images")
        return "MSD", files
    found = {"lits": [], "mhd": []}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if f.startswith("."):
                continue
            if re.fullmatch(r"volume-\d+\.nii(\.gz)?", f):
                found["lits"].append(join(root, f))
            elif f.lower().endswith(".mhd"):
                found["mhd"].append(join(root, f))
    if found["lits"]:
        return "LiTS", found["lits"]
    if found["mhd"]:
        found["mhd"] = _luna16_subsets(folder, found["mhd"], subsets)
        missing = []
        for f in found["mhd"]:
            data = _mhd_data_file(f)
            if data is not None and not isfile(data):
                missing.append(os.path.relpath(data, folder))
        if missing:
            raise SARError(f"{len(missing)} MetaImage data file(s) missing under {folder}: {_short_list(missing)}")
        return "LUNA16", found["mhd"]
    raise SARError(f"no images in {folder}: expected an MSD task folder with imagesTr/*.nii.gz (e.g. "
                   f"Task02_Heart), LiTS volume-*.nii files, or LUNA16 *.mhd files (+ .raw)")


def _luna16_subsets(folder: str, files: list, subsets) -> list:
    """The files in ``subsetN/`` folders with N in ``subsets``; all files when there are no such folders."""
    subset_of = {f: re.fullmatch(r"subset(\d+)", os.path.basename(os.path.dirname(f))) for f in files}
    if not any(subset_of.values()):
        return files
    kept = [f for f, m in subset_of.items() if m and int(m.group(1)) in set(subsets)]
    if not kept:
        found = sorted({int(m.group(1)) for m in subset_of.values() if m})
        raise SARError(f"--subsets {' '.join(map(str, subsets))}: none of the subset folders {found} under {folder}")
    return kept


def parse_subsets(text: str) -> list:
    """``'0-6'`` or ``'0,2,5'`` -> subset numbers (argparse type of ``--subsets``)."""
    numbers = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            numbers.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--subsets {text!r}: give a range like 0-6 or numbers like 0,2,5") from None
    return sorted(numbers)


def _mhd_data_file(mhd: str) -> str | None:
    with open(mhd, errors="replace") as f:
        for line in f:
            k, _, v = line.partition("=")
            if k.strip() == "ElementDataFile":
                v = v.strip()
                return None if v.upper() == "LOCAL" or v.upper().startswith("LIST") else join(os.path.dirname(mhd), v)
    return None


def _case_name(fname: str) -> str:
    base = os.path.basename(fname)
    for e in (".nii.gz", ".nii", ".mhd"):
        if base.lower().endswith(e):
            return base[:-len(e)]
    return base


def convert_source(folder: str, dataset_id: int, name: str, modality: str, overwrite: bool = False,
                   subsets=LUNA16_SUBSETS) -> str:
    """A pre-training source folder -> nnU-Net raw dataset of images only (imagesTr), channel name CT or MRI."""
    import SimpleITK as sitk
    modality = modality.upper()
    if modality not in ("CT", "MRI"):
        raise SARError(f"modality must be CT or MRI, got {modality!r}")
    layout, files = find_source_images(folder, subsets)
    _check_headers(files, "; for multi-channel MSD tasks use nnUNetv2_convert_MSD_dataset")
    names = [_case_name(f) for f in files]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SARError(f"{folder}: several files give the same case name: {_short_list(dup)}")
    file_ending = ".nii" if layout == "LiTS" and all(f.endswith(".nii") for f in files) else ".nii.gz"
    out = _raw_dataset_folder(dataset_id, name, overwrite)
    for f, case in zip(files, names):
        target = join(out, "imagesTr", f"{case}_0000{file_ending}")
        if f.endswith(file_ending):
            shutil.copyfile(f, target)
        else:
            sitk.WriteImage(sitk.ReadImage(f), target, useCompression=True)
    _write_dataset_json(out, (modality,), {"background": 0}, len(files), file_ending,
                        f"{layout} images from {os.path.abspath(folder)}, unlabeled pre-training source")
    return out


def main_convert_source(argv=None):
    p = argparse.ArgumentParser(
        prog="nnunet_sar_convert_source",
        description="A pre-training source (LUNA16 *.mhd, LiTS volume-*.nii, MSD task imagesTr/ and imagesTs/, "
                    "e.g. Task02_Heart) -> nnU-Net raw dataset of images only, channel name CT or MRI.")
    p.add_argument("-i", required=True, help="source folder")
    p.add_argument("-d", required=True, type=int, help="nnU-Net dataset id of the new raw dataset")
    p.add_argument("-n", required=True, help="dataset name, e.g. LUNA16, LiTS, Heart")
    p.add_argument("-m", required=True, type=str.upper, choices=("CT", "MRI"), help="modality")
    p.add_argument("--subsets", type=parse_subsets, default=list(LUNA16_SUBSETS),
                   help="LUNA16 subsetN/ folders to convert (paper: 0-6, 623 scans) [0-6]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")

    def run(argv):
        a = p.parse_args(argv)
        out = convert_source(a.i, a.d, a.n, a.m, a.overwrite, a.subsets)
        print(f"wrote {out}: {len(os.listdir(join(out, 'imagesTr')))} cases")
    _run(run, argv, "nnunet_sar_convert_source")


# ------------------------------------------------------------------------------------------- splits
def raw_case_ids(dataset) -> list[str]:
    """Training case ids of an nnU-Net raw dataset (name or id)."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    from nnunet_sar.network import dataset_name
    folder = join(_raw_root(), dataset_name(dataset))
    if not isfile(join(folder, "dataset.json")):
        raise SARError(f"{folder} has no dataset.json")
    with open(join(folder, "dataset.json")) as f:
        dj = json.load(f)
    if "dataset" in dj:
        return sorted(dj["dataset"])
    return sorted(get_identifiers_from_splitted_dataset_folder(join(folder, "imagesTr"), dj["file_ending"]))


def write_random_split(dataset, ratio=(2, 1), seed: int = 12345, trials: int = 1, overwrite: bool = False) -> list:
    """Writes nnU-Net's ``splits_final.json`` for a random train : test split (paper 3.2.1: 2 : 1) into
    the dataset's preprocessed folder and returns the test case ids (to exclude from pre-training).

    Each split is ``{'train': training cases, 'val': test cases}``: nnU-Net trains fold 0 on 'train' and
    validates (the final validation writes ``validation/summary.json``) on the held-out test cases.
    ``trials`` > 1 writes the same split that many times, so folds 0..trials-1 are the paper's repeated
    trials on one split ("mean and standard deviation of five trials"). An existing different
    splits_final.json is kept unless ``overwrite``."""
    from nnunet_sar.network import preprocessed_folder
    ids = raw_case_ids(dataset)
    a, b = (int(r) for r in ratio)
    if a <= 0 or b <= 0:
        raise SARError(f"ratio must be two positive integers, got {ratio}")
    if len(ids) < 2:
        raise SARError(f"dataset {dataset} has {len(ids)} case(s); a split needs at least 2")
    n_test = min(len(ids) - 1, max(1, int(round(len(ids) * b / (a + b)))))
    order = np.random.RandomState(seed).permutation(len(ids))
    test = sorted(ids[i] for i in order[:n_test])
    train = sorted(ids[i] for i in order[n_test:])
    splits = [{"train": train, "val": test} for _ in range(max(1, int(trials)))]
    folder = preprocessed_folder(dataset)
    fname = join(folder, "splits_final.json")
    if isfile(fname) and not overwrite:
        with open(fname) as f:
            if json.load(f) != splits:
                raise SARError(f"{fname} exists with other splits (nnU-Net may have made its 5-fold split "
                               f"already); pass --overwrite to replace it")
    os.makedirs(folder, exist_ok=True)
    with open(fname, "w") as f:
        json.dump(splits, f, indent=1)
    return test


def main_split(argv=None):
    p = argparse.ArgumentParser(
        prog="nnunet_sar_split",
        description="Random train : test split (paper 3.2.1: 2 : 1) as nnU-Net's splits_final.json; fold 0 "
                    "(.. trials-1) trains on the training part and validates on the test part.")
    p.add_argument("-d", required=True, help="dataset name or id (raw dataset)")
    p.add_argument("--ratio", nargs=2, type=int, default=(2, 1), metavar=("TRAIN", "TEST"))
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--trials", type=int, default=1, help="repeat the split as folds 0..N-1 (paper: 5 trials)")
    p.add_argument("--overwrite", action="store_true")

    def run(argv):
        a = p.parse_args(argv)
        test = write_random_split(a.d, tuple(a.ratio), a.seed, a.trials, a.overwrite)
        from nnunet_sar.network import preprocessed_folder
        print(f"wrote {join(preprocessed_folder(a.d), 'splits_final.json')}: {len(test)} test cases; exclude them "
              f"from pre-training with --exclude-from that file")
    _run(run, argv, "nnunet_sar_split")
