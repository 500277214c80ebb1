"""The real nnU-Net path: plan -> nnunet_sar_pretrain -> nnUNetv2_train -tr -> nnUNetv2_predict -> evaluate."""
import json
import os
from os.path import isfile, join

from conftest import TARGET, TARGET_ID, exe, run


def test_console_scripts_have_help():
    for script in ("nnunet_sar_pretrain", "nnunet_sar_demo"):
        out = run([exe(script), "--help"]).stdout
        assert "usage:" in out and "-device" in out
    assert "--sources" in run([exe("nnunet_sar_pretrain"), "--help"]).stdout


def test_pretrain_refuses_to_overwrite_a_run(pretrained):
    done = run([exe("nnunet_sar_pretrain"), "-d", str(TARGET_ID), "--sources", "802", "803", "-device", "cpu"],
               check=False)
    assert done.returncode != 0
    assert "--continue" in done.stderr and "--overwrite" in done.stderr and "Traceback" not in done.stderr


def test_finetune_predict_evaluate(pretrained):
    run([exe("nnUNetv2_train"), str(TARGET_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerSAR_demo", "-device", "cpu"])
    fold = join(os.environ["nnUNet_results"], TARGET, "nnUNetTrainerSAR_demo__nnUNetPlans__3d_fullres", "fold_0")
    assert isfile(join(fold, "checkpoint_final.pth"))
    logs = [f for f in os.listdir(fold) if f.startswith("training_log")]
    text = open(join(fold, logs[0])).read()
    assert "SAR: loaded" in text and "checkpoint_final.pth" in text
    images = join(os.environ["nnUNet_raw"], TARGET, "imagesTs")
    pred = join(fold, "..", "test_pred")
    run([exe("nnUNetv2_predict"), "-i", images, "-o", pred, "-d", str(TARGET_ID), "-c", "3d_fullres", "-f", "0",
         "-tr", "nnUNetTrainerSAR_demo", "-device", "cpu"])
    assert sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz")) == ["case_006.nii.gz", "case_007.nii.gz"]
    run([exe("nnUNetv2_evaluate_folder"), join(os.environ["nnUNet_raw"], TARGET, "labelsTs"), pred,
         "-djfile", join(os.environ["nnUNet_raw"], TARGET, "dataset.json"),
         "-pfile", join(os.environ["nnUNet_preprocessed"], TARGET, "nnUNetPlans.json")])
    summary = json.load(open(join(pred, "summary.json")))
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
