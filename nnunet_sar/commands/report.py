"""``nnunet_sar_report``: the paper's tables and loss figure from nnU-Net result folders.

For each trainer and fold it reads ``$nnUNet_results/D/TRAINER__PLANS__CONF/fold_F/validation/summary.json``
(written by nnU-Net after training, or by ``nnUNetv2_evaluate_folder``; ``--summaries TRAINER=FILE`` adds
any other file, one per fold) and writes into OUT:

- ``dice.csv`` / ``report.md``: Table 2: Dice per class as mean +- std over folds, where a fold's value
  is the mean over its cases (NaN cases, i.e. class absent in reference and prediction, left out, as
  nnU-Net's own mean). For the tumor class (the label named like "tumor", else the last one) also
  small / medium / large strata by the reference tumor volume (``n_ref`` of the per-case metrics, in
  voxels, or in ml with ``--strata-unit ml`` from the reference files' spacing). Thresholds: the
  ``--strata-thresholds A B`` (small < A <= medium < B <= large), by default the tertiles of the
  reference volumes of all distinct cases; cases without tumor belong to no stratum. Both are stated in
  the report.
- ``ttests.csv``: independent two-sample t-tests (``scipy.stats.ttest_ind``, equal variances) of the SAR
  trainer (``--sar``, default the first trainer starting with nnUNetTrainerSAR) against every other
  trainer, per column, on the per-fold values (``--ttest-on cases``: on the per-case values).
- ``data_efficiency.csv``: Table 4 when ``*_fracK`` trainers are given: mean foreground Dice (mean
  over classes) per trainer family and fraction 1/K (1/1 = the family's base trainer if given).
- ``loss_curves.png`` / ``.csv``: Fig. 3: the training loss per epoch of every trainer (mean over folds),
  from each fold's ``checkpoint_final.pth`` (``['logging']['train_losses']``; else
  ``checkpoint_latest.pth``, else the ``train_loss`` lines of ``training_log_*.txt``).
- ``per_case.csv``: every value the tables are computed from.
"""
import argparse
import csv
import glob
import json
import os
import re
import warnings
from os.path import basename, isfile, join

import numpy as np

from nnunet_sar import SARError, console_main, nnunet_folder

STRATA = ("S", "M", "L")
SAR_ABLATIONS = ("nnUNetTrainerSAR_SAonly", "nnUNetTrainerSAR_MIALonly")  # Table 2's "+ SA" and "+ MIAL" rows


def table2_trainers() -> list:
    """Every trainer of Table 2: nnU-Net from scratch, one per pre-training objective (``--objective``, found
    in ``pretraining/objectives``), and SAR's two ablations."""
    from nnunet_sar.pretraining.objectives import available, objective_class
    by_objective = [objective_class(n).trainer for n in ("sar", "genesis", "rot", "rpl", "jigsaw", "cpc", "mae")
                    if n in available()]
    rest = [objective_class(n).trainer for n in available() if objective_class(n).trainer not in by_objective]
    return ["nnUNetTrainer", *by_objective, *rest, *SAR_ABLATIONS]
FRACTION = re.compile(r"^(?P<base>.+)_frac(?P<k>\d+)$")


# ------------------------------------------------------------------------------------------ inputs
def result_folder(dataset_name: str, trainer: str, plans: str, configuration: str) -> str:
    return join(nnunet_folder("nnUNet_results"), dataset_name, f"{trainer}__{plans}__{configuration}")


def _case_id(reference_file: str) -> str:
    name = basename(reference_file)
    for e in (".nii.gz", ".nii", ".nrrd", ".mha", ".tif", ".tiff", ".png", ".npy"):
        if name.endswith(e):
            return name[:-len(e)]
    return os.path.splitext(name)[0]


def load_summary(fname: str) -> list[dict]:
    """Per-case rows {case, key, dice, n_ref, reference_file} of an nnU-Net summary.json."""
    try:
        with open(fname) as f:
            s = json.load(f)
        rows = []
        for entry in s["metric_per_case"]:
            for key, m in entry["metrics"].items():
                dice = m.get("Dice")
                rows.append({"case": _case_id(entry["reference_file"]), "key": str(key),
                             "dice": float("nan") if dice is None else float(dice),
                             "n_ref": float(m["n_ref"]) if "n_ref" in m else float(m["TP"] + m["FN"]),
                             "reference_file": entry["reference_file"]})
        return rows
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SARError(f"cannot read per-case metrics from {fname}: {type(e).__name__}: {e}") from None


def class_names(dataset_json: dict | None, keys) -> dict:
    """summary.json key ("1", "(1, 2)") -> class name from dataset.json's labels (the key itself if unknown)."""
    names = {}
    for name, value in ((dataset_json or {}).get("labels") or {}).items():
        key = str(value) if isinstance(value, int) else str(tuple(value)) if len(value) > 1 else str(value[0])
        names[key] = name
    return {k: names.get(k, k) for k in keys}


def _train_losses(fold_folder: str) -> list[float] | None:
    for ck in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        f = join(fold_folder, ck)
        if isfile(f):
            import torch
            try:
                c = torch.load(f, map_location="cpu", weights_only=False)
                return [float(v) for v in c["logging"]["train_losses"]]
            except Exception as e:  # noqa: BLE001 - a broken checkpoint: try the log
                warnings.warn(f"cannot read train_losses from {f}: {type(e).__name__}: {e}")
    logs = sorted(glob.glob(join(fold_folder, "training_log_*.txt")))
    if logs:
        losses = {}
        for log in logs:  # a resumed run has several logs; later epochs override
            epoch = None
            with open(log, errors="replace") as f:
                for line in f:
                    m = re.search(r"Epoch (\d+)\s*$", line)
                    if m:
                        epoch = int(m.group(1))
                    m = re.search(r"train_loss (-?[\d.eE+-]+|nan)\s*$", line)
                    if m and epoch is not None:
                        losses[epoch] = float(m.group(1))
        if losses:
            return [losses[e] for e in sorted(losses)]
    return None


def collect(trainers, dataset=None, plans="nnUNetPlans", configuration="3d_fullres", folds=(0, 1, 2, 3, 4),
            summaries=None):
    """{trainer: {fold: (summary.json, fold folder or None)}}, dataset.json (or None)."""
    found, dataset_json, dataset_name = {}, None, None
    if trainers:
        if dataset is None:
            raise SARError("-d DATASET is needed to find the result folders of -tr trainers")
        from nnunet_sar.network import dataset_name as resolve
        dataset_name = resolve(dataset)
    for t in trainers or ():
        folder = result_folder(dataset_name, t, plans, configuration)
        got = {}
        for f in folds:
            s = join(folder, f"fold_{f}", "validation", "summary.json")
            if isfile(s):
                got[f] = (s, join(folder, f"fold_{f}"))
        if not got:
            raise SARError(f"trainer {t}: no validation/summary.json in {folder}/fold_{{{','.join(map(str, folds))}}} "
                           f"(train with nnUNetv2_train {dataset} {configuration} FOLD -tr {t} -p {plans})")
        missing = [f for f in folds if f not in got]
        if missing:
            warnings.warn(f"trainer {t}: folds {missing} have no validation/summary.json; using folds {sorted(got)}")
        found[t] = got
        if dataset_json is None and isfile(join(folder, "dataset.json")):
            with open(join(folder, "dataset.json")) as fh:
                dataset_json = json.load(fh)
    for spec in summaries or ():
        if "=" not in spec:
            raise SARError(f"--summaries takes TRAINER=path/summary.json, got {spec!r}")
        t, path = spec.split("=", 1)
        if not isfile(path):
            raise SARError(f"--summaries {spec}: {path} does not exist")
        got = found.setdefault(t, {})
        fold = max(got, default=-1) + 1
        got[fold] = (path, os.path.dirname(os.path.dirname(os.path.abspath(path))))
    if not found:
        raise SARError("no trainers given: use -tr TRAINER ... and/or --summaries TRAINER=FILE ...")
    if dataset_json is None and dataset_name is not None:
        for root in (os.environ.get("nnUNet_preprocessed"), os.environ.get("nnUNet_raw")):  # optional here
            if root and isfile(join(root, dataset_name, "dataset.json")):
                with open(join(root, dataset_name, "dataset.json")) as fh:
                    dataset_json = json.load(fh)
                break
    return found, dataset_json


# ------------------------------------------------------------------------------------------ numbers
def mean_std(values):
    """(mean, sample sd, n) of the values that are not NaN (a fold or an arm without a score)."""
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _voxel_ml(reference_file: str) -> float:
    import SimpleITK as sitk
    if not isfile(reference_file):
        raise SARError(f"--strata-unit ml needs the reference file {reference_file} (for its spacing); "
                       f"it does not exist: use voxels")
    r = sitk.ImageFileReader()
    r.SetFileName(reference_file)
    r.ReadImageInformation()
    return float(np.prod(r.GetSpacing())) / 1000.0


def tumor_key(keys, names: dict, requested: str | None = None) -> str:
    if requested is not None:
        for k in keys:
            if requested in (k, names.get(k)):
                return k
        raise SARError(f"--tumor-label {requested!r} is none of the classes {[names[k] for k in keys]}")
    for k in keys:
        if "tumo" in str(names.get(k, "")).lower():
            return k
    return keys[-1]


def compute(found: dict, dataset_json=None, strata_thresholds=None, strata_unit="voxels", tumor_label=None,
            strata=True, sar=None, ttest_on="folds"):
    """All numbers of the report as plain data (the tests compare them with a computation by hand)."""
    from scipy.stats import ttest_ind
    rows = []
    for t, folds in found.items():
        for f, (path, _) in sorted(folds.items()):
            for r in load_summary(path):
                rows.append({"trainer": t, "fold": f, **r})
    keys = sorted({r["key"] for r in rows}, key=lambda k: (len(k), k))
    names = class_names(dataset_json, keys)
    columns = [(names[k], k, None) for k in keys]
    thresholds = None
    if strata:
        tk = tumor_key(keys, names, tumor_label)
        tumor_rows = [r for r in rows if r["key"] == tk]
        for r in tumor_rows:
            r["volume"] = r["n_ref"] * (_voxel_ml(r["reference_file"]) if strata_unit == "ml" else 1.0)
        volumes = {}
        for r in tumor_rows:
            volumes[r["case"]] = r["volume"]
        positive = np.array([v for v in volumes.values() if v > 0])
        if strata_thresholds is None:
            if len(positive) == 0:
                raise SARError("no case has a reference tumor: no strata (pass --no-strata)")
            thresholds = tuple(float(x) for x in np.percentile(positive, [100 / 3, 200 / 3]))
            threshold_source = "tertiles of the reference tumor volumes of the distinct cases"
        else:
            thresholds = tuple(float(x) for x in strata_thresholds)
            threshold_source = "given"
        if not thresholds[0] < thresholds[1]:
            raise SARError(f"strata thresholds must increase, got {thresholds}")
        for r in tumor_rows:
            v = r["volume"]
            r["stratum"] = None if v <= 0 else "S" if v < thresholds[0] else "M" if v < thresholds[1] else "L"
        tname = names[tk]
        columns = [c for c in columns if c[1] != tk] + [(f"{tname}{s}", tk, s) for s in STRATA] + [(f"{tname}all", tk, None)]
    trainers = list(found)

    def values(t, key, stratum, per):
        sel = [r for r in rows if r["trainer"] == t and r["key"] == key and (stratum is None or r.get("stratum") == stratum)]
        if per == "cases":
            return [r["dice"] for r in sel]
        out = []
        for f in sorted(found[t]):
            d = [r["dice"] for r in sel if r["fold"] == f and not np.isnan(r["dice"])]
            out.append(float(np.mean(d)) if d else float("nan"))
        return out

    table = {t: {c[0]: mean_std(values(t, c[1], c[2], "folds")) for c in columns} for t in trainers}
    # foreground mean per fold: mean over classes of the fold's class means (nnU-Net's foreground_mean)
    fg = {}
    for t in trainers:
        per_class = np.array([values(t, k, None, "folds") for k in keys])
        fg[t] = mean_std(list(np.nanmean(per_class, axis=0))) if per_class.size else (float("nan"),) * 2 + (0,)
    if sar is None:
        sar = next((t for t in trainers if t.startswith("nnUNetTrainerSAR") and not FRACTION.match(t)), trainers[0])
    elif sar not in found:
        raise SARError(f"--sar {sar} is not among the trainers {trainers}")
    tests = []
    for t in trainers:
        if t == sar or FRACTION.match(t):
            continue
        for c in columns:
            a = [x for x in values(sar, c[1], c[2], ttest_on) if not np.isnan(x)]
            b = [x for x in values(t, c[1], c[2], ttest_on) if not np.isnan(x)]
            if len(a) >= 2 and len(b) >= 2:
                res = ttest_ind(a, b)
                stat, p = float(res.statistic), float(res.pvalue)
            else:
                stat = p = float("nan")
            tests.append({"sar": sar, "other": t, "column": c[0], "t": stat, "p": p, "n_sar": len(a), "n_other": len(b)})
    efficiency = {}
    for t in trainers:
        m = FRACTION.match(t)
        if m:
            efficiency.setdefault(m.group("base"), {})[int(m.group("k"))] = fg[t]
    for base in efficiency:
        if base in fg:
            efficiency[base][1] = fg[base]
    return {"rows": rows, "columns": [c[0] for c in columns], "table": table, "foreground": fg, "ttests": tests,
            "sar": sar, "thresholds": thresholds, "threshold_source": threshold_source if strata else None,
            "strata_unit": strata_unit, "efficiency": efficiency, "ttest_on": ttest_on,
            "main_trainers": [t for t in trainers if not FRACTION.match(t)]}


# ------------------------------------------------------------------------------------------ outputs
def _fmt(ms, scale=100.0):
    m, s, n = ms
    return "n/a" if n == 0 else f"{m * scale:.2f} ± {s * scale:.2f}"


def plot_losses(found: dict, out_png: str, out_csv: str) -> dict:
    curves = {}
    for t, folds in found.items():
        per_fold = [c for c in (_train_losses(folder) for _, folder in folds.values() if folder) if c]
        if per_fold:
            n = min(len(c) for c in per_fold)
            curves[t] = np.mean([c[:n] for c in per_fold], axis=0)
        else:
            warnings.warn(f"trainer {t}: no checkpoint or training log with train_losses; left out of the loss figure")
    if not curves:
        return curves
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for t, c in curves.items():
        ax.plot(np.arange(len(c)), c, label=t)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (mean over folds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", *curves])
        for e in range(max(len(c) for c in curves.values())):
            w.writerow([e, *(f"{c[e]:.6g}" if e < len(c) else "" for c in curves.values())])
    return curves


def write_report(result: dict, found: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    cols, table = result["columns"], result["table"]
    with open(join(out, "dice.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trainer", *(f"{c}_{s}" for c in cols for s in ("mean", "std", "n_folds")), "foreground_mean",
                    "foreground_std"])
        for t in result["main_trainers"] + [t for t in table if t not in result["main_trainers"]]:
            w.writerow([t, *(x for c in cols for x in table[t][c]), *result["foreground"][t][:2]])
    with open(join(out, "ttests.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["sar", "other", "column", "t", "p", "n_sar", "n_other"])
        w.writeheader()
        w.writerows(result["ttests"])
    with open(join(out, "per_case.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["trainer", "fold", "case", "key", "dice", "n_ref", "volume", "stratum", "reference_file"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(result["rows"])
    md = ["# nnunet-sar report", ""]
    md += ["## Dice (%) per class, mean ± std over folds (Table 2)", "",
           "A fold's value is the mean Dice over its cases (cases where the class is absent in reference and "
           "prediction left out); std is the sample standard deviation (ddof=1) over folds.", ""]
    if result["thresholds"]:
        a, b = result["thresholds"]
        md += [f"Tumor strata by reference tumor volume in {result['strata_unit']} ({result['threshold_source']}): "
               f"S < {a:.6g} ≤ M < {b:.6g} ≤ L; cases without reference tumor are in no stratum.", ""]
    md += ["| trainer | folds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for t in result["main_trainers"]:
        md.append(f"| {t} | {len(found[t])} | " + " | ".join(_fmt(table[t][c]) for c in cols) + " |")
    md += ["", f"## t-tests: {result['sar']} vs. the others (scipy.stats.ttest_ind on per-{result['ttest_on'][:-1]} "
           f"Dice, equal variances)", "", "| other | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    others = [t for t in result["main_trainers"] if t != result["sar"]]
    for t in others:
        cells = {x["column"]: x for x in result["ttests"] if x["other"] == t}
        md.append(f"| {t} | " + " | ".join("n/a" if np.isnan(cells[c]["p"]) else
                                          f"p={cells[c]['p']:.3g}{' *' if cells[c]['p'] < 0.05 else ''}"
                                          for c in cols) + " |")
    if not others:
        md.append("(no other trainer given)")
    if result["efficiency"]:
        ks = sorted({k for d in result["efficiency"].values() for k in d})
        md += ["", "## Data efficiency: mean foreground Dice (%) by fraction of the training cases (Table 4)", "",
               "| trainer | " + " | ".join(f"1/{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        with open(join(out, "data_efficiency.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["trainer", *(f"1/{k}_{s}" for k in ks for s in ("mean", "std", "n_folds"))])
            for base, d in result["efficiency"].items():
                w.writerow([base, *(x for k in ks for x in d.get(k, (float("nan"),) * 2 + (0,)))])
                md.append(f"| {base} | " + " | ".join(_fmt(d[k]) if k in d else "" for k in ks) + " |")
    curves = plot_losses(found, join(out, "loss_curves.png"), join(out, "loss_curves.csv"))
    md += ["", "## Training loss (Fig. 3)", ""]
    md += ["![training loss](loss_curves.png)"] if curves else ["(no training logs found)"]
    md += ["", "Files: dice.csv, ttests.csv, per_case.csv" + (", data_efficiency.csv" if result["efficiency"] else "")
           + (", loss_curves.png, loss_curves.csv" if curves else ""), ""]
    fname = join(out, "report.md")
    with open(fname, "w") as f:
        f.write("\n".join(md))
    return fname


def run(argv=None) -> dict:
    """The command's work; returns compute()'s numbers (``main`` returns None, as console scripts must)."""
    p = argparse.ArgumentParser(prog="nnunet_sar_report", description=__doc__.split("\n\n")[0])
    p.add_argument("-d", default=None, help="dataset name or id")
    p.add_argument("-tr", nargs="+", default=[],
                   help="trainers (result folders TRAINER__PLANS__CONF); 'table2' stands for every trainer of Table 2: "
                        + " ".join(table2_trainers()))
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-c", default="3d_fullres", help="configuration")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--summaries", nargs="+", default=[], metavar="TRAINER=FILE",
                   help="extra summary.json files, one per fold (repeat TRAINER for several folds)")
    p.add_argument("--strata-thresholds", nargs=2, type=float, default=None, metavar=("A", "B"),
                   help="small < A <= medium < B <= large (default: tertiles of the reference tumor volumes)")
    p.add_argument("--strata-unit", choices=("voxels", "ml"), default="voxels")
    p.add_argument("--tumor-label", default=None, help="class to stratify (name or key; default: 'tumor'-like name, else last)")
    p.add_argument("--no-strata", action="store_true", help="no size strata (e.g. for organ tasks)")
    p.add_argument("--sar", default=None, help="the trainer tested against all others")
    p.add_argument("--ttest-on", choices=("folds", "cases"), default="folds")
    p.add_argument("-o", required=True, help="output folder")
    a = p.parse_args(argv)
    a.tr = [t for name in a.tr for t in (table2_trainers() if name == "table2" else [name])]
    result, fname = console_main("nnunet_sar_report")(_report)(a)
    print(f"wrote {fname}")
    return result


def _report(a):
    found, dj = collect(a.tr, a.d, a.p, a.c, a.folds, a.summaries)
    result = compute(found, dj, a.strata_thresholds, a.strata_unit, a.tumor_label, not a.no_strata, a.sar, a.ttest_on)
    return result, write_report(result, found, a.o)


def main(argv=None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
