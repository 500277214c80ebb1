"""The real nnU-Net path as commands: plan -> nnunet_sar_pretrain -> nnUNetv2_train -tr -> nnUNetv2_predict ->
nnUNetv2_evaluate_folder, through the demo that the README runs first."""
import json
import os
from os.path import isfile, join

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TARGET_ID, exe, run
from nnunet_sar.commands.demo import TARGET as DEMO

DEMO_TARGET = f"Dataset{DEMO[0]:03d}_{DEMO[1]}"  # nnunet_sar_demo's target


def test_console_scripts_have_help():
    out = {script: run([exe(script), "--help"]).stdout for script in ("nnunet_sar_pretrain", "nnunet_sar_demo")}
    assert all("usage:" in o and "-device" in o for o in out.values())
    assert "--sources" in out["nnunet_sar_pretrain"]


@pytest.mark.slow  # needs the pre-training run of the `pretrained` fixture
def test_pretrain_refuses_to_overwrite_a_run(pretrained):
    done = run([exe("nnunet_sar_pretrain"), "-d", str(TARGET_ID), "--sources", "802", "803", "-device", "cpu"],
               check=False)
    assert done.returncode != 0
    assert "--continue" in done.stderr and "--overwrite" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # the tiny demo of the gpu check's CPU form: every step as a command
def test_demo_pretrains_finetunes_predicts_and_evaluates_in_nnunet_folders(gpu_check_cpu):
    """``nnunet_sar_demo --tiny`` (run by the gpu check, its folders kept): nnUNetv2_train found the pre-training
    where nnunet_sar_pretrain wrote it, nnUNetv2_predict segmented every test case and nnUNetv2_evaluate_folder's
    Dice is the Dice of the files. Two iterations: whether the start learns is the faint-tumour test's
    (test_transfer.py), not this one's."""
    results = join(gpu_check_cpu["root"], "nnUNet_results", DEMO_TARGET)
    raw = join(gpu_check_cpu["root"], "nnUNet_raw", DEMO_TARGET)
    pretraining = join(results, "nnUNetSARPretrain_sar__nnUNetPlans__3d_fullres", "checkpoint_final.pth")
    fold = join(results, "nnUNetTrainerSAR_check__nnUNetPlans__3d_fullres", "fold_0")
    assert isfile(pretraining) and isfile(join(fold, "checkpoint_final.pth")), gpu_check_cpu["done"].stdout[-3000:]
    logs = [f for f in os.listdir(fold) if f.startswith("training_log")]
    text = open(join(fold, logs[0])).read()
    assert f"from {pretraining}" in text and "SAR: loaded" in text
    pred = join(fold, "..", "test_predictions")
    cases = sorted(f for f in os.listdir(join(raw, "labelsTs")) if f.endswith(".nii.gz"))
    assert len(cases) == 2 and sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz")) == cases
    summary = json.load(open(join(pred, "summary.json")))
    # nnU-Net's evaluation scored our predictions: recompute each case's Dice from the files themselves
    per_case = summary["metric_per_case"]
    assert sorted(os.path.basename(c["prediction_file"]) for c in per_case) == cases
    dice = []
    for c in per_case:
        p = sitk.GetArrayFromImage(sitk.ReadImage(c["prediction_file"])) == 1
        g = sitk.GetArrayFromImage(sitk.ReadImage(c["reference_file"])) == 1
        assert p.shape == g.shape and g.any()  # every phantom test case has a tumour
        dice.append(2 * (p & g).sum() / (p.sum() + g.sum()))
        assert c["metrics"]["1"]["Dice"] == pytest.approx(dice[-1], abs=1e-6)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(np.mean(dice), abs=1e-6)
