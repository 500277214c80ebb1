"""The paper's experiments inside nnU-Net: trainers (fine-tuning recipe, label fractions), input-channel
adaptation, splits, dataset converters and the report. Trainers run in-process on the CPU."""
import csv
import json
import os
from os.path import isfile, join

import numpy as np
import pytest
import torch
from conftest import TARGET

FRACTIONS = (2, 5, 10, 20, 50)
PAPER_FT = ("nnUNetTrainerSAR_paperFT", "nnUNetTrainer_paperFT")


def _trainer(name, plans="nnUNetPlans"):
    from nnunetv2.run.run_training import get_trainer_from_args
    return get_trainer_from_args(TARGET, "3d_fullres", 0, name, plans, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------ trainers
def test_nnunet_lookup_finds_the_experiment_trainers():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunet_sar.finetuning import PaperFineTuning, TrainingFraction, nnUNetTrainerSAR
    for name in PAPER_FT + tuple(f"{p}_frac{k}" for p in ("nnUNetTrainerSAR", "nnUNetTrainer") for k in FRACTIONS):
        cls = recursive_find_trainer_class_by_name(name)
        assert cls.__name__ == name and issubclass(cls, nnUNetTrainer)
        assert issubclass(cls, nnUNetTrainerSAR) == name.startswith("nnUNetTrainerSAR")
        assert issubclass(cls, PaperFineTuning) == name.endswith("paperFT")
        if "_frac" in name:
            assert issubclass(cls, TrainingFraction) and cls.fraction_denominator == int(name.split("frac")[1])


def _random_batch(trainer):
    patch = trainer.configuration_manager.patch_size
    n_classes = trainer.label_manager.num_segmentation_heads
    data = torch.rand(2, trainer.num_input_channels, *patch)
    scales = trainer._get_deep_supervision_scales()
    target = [torch.randint(0, n_classes, (2, 1, *[int(round(p * s)) for p, s in zip(patch, sc)])).float()
              for sc in scales]
    return {"data": data, "target": target}


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_plans, tmp_path_factory):
    """A pre-training checkpoint in SAR's format for the tiny plans (made directly: a pre-training run
    is covered elsewhere and too slow for this file's time budget)."""
    from nnunet_sar.network import build_pretraining_network, load_plans, nnunet_weights
    net = build_pretraining_network(*load_plans(TARGET, tiny_plans)[:2], 1)
    fname = str(tmp_path_factory.mktemp("ckpt") / "checkpoint_final.pth")
    torch.save({"network_weights": nnunet_weights(net.state_dict())}, fname)
    return fname


@pytest.mark.parametrize("name", PAPER_FT)
def test_paper_finetuning_recipe_runs(tiny_plans, tiny_checkpoint, monkeypatch, name):
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1
    monkeypatch.setenv("nnUNet_SAR_checkpoint", tiny_checkpoint)
    trainer = _trainer(name, tiny_plans)
    trainer.initialize()
    assert type(trainer.optimizer) is torch.optim.Adam
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    # Dice only: the loss equals nnU-Net's soft Dice loss (deep-supervision weighted), no cross-entropy
    batch = _random_batch(trainer)
    with torch.no_grad():
        out = trainer.network(batch["data"])
        dice = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=trainer.configuration_manager.batch_dice,
                                           do_bg=False, smooth=1e-5, ddp=False)
        w = trainer.loss.weight_factors
        expected = sum(wi * dice(o, t) for wi, o, t in zip(w, out, batch["target"]) if wi != 0)
        assert float(trainer.loss(out, batch["target"])) == pytest.approx(float(expected), rel=1e-5)
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(2)]
    assert all(np.isfinite(losses)) and all(-1 <= v <= 0 for v in losses)
    if name.startswith("nnUNetTrainerSAR"):
        with open(trainer.log_file) as f:
            assert f"pre-trained tensors (all but the seg layers) from {tiny_checkpoint}" in f.read()


def test_plateau_schedule_steps_on_the_validation_loss(planned_target, tiny_plans, tmp_path):
    trainer = _trainer("nnUNetTrainer_paperFT", tiny_plans)
    trainer.plateau_patience = 1
    trainer.initialize()
    trainer.output_folder = str(tmp_path)
    trainer.lr_scheduler.step(5)  # nnU-Net's per-epoch call with the epoch number must not count as a loss
    lrs = []
    for epoch, val_loss in enumerate([-0.5, -0.6, -0.55, -0.55, -0.55]):
        trainer.lr_scheduler.step(epoch)
        for key, value in (("train_losses", -0.5), ("val_losses", val_loss), ("mean_fg_dice", 0.5),
                           ("dice_per_class_or_region", [0.5]), ("lrs", trainer.optimizer.param_groups[0]["lr"]),
                           ("epoch_start_timestamps", 0.0)):
            trainer.logger.log(key, value, epoch)
        trainer.on_epoch_end()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    # best -0.6 at epoch 1; bad epochs 2, 3 -> halve after epoch 3 (patience 1); bad epoch 4, 5 -> ...
    assert lrs[:3] == [1e-3, 1e-3, 1e-3] and lrs[3] == pytest.approx(5e-4)
    # resume rebuilds the schedule from the logged validation losses
    trainer.save_checkpoint(str(tmp_path / "ck.pth"))
    other = _trainer("nnUNetTrainer_paperFT", tiny_plans)
    other.plateau_patience = 1
    other.load_checkpoint(str(tmp_path / "ck.pth"))
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[-1])
    assert other.lr_scheduler.num_bad_epochs == trainer.lr_scheduler.num_bad_epochs
    assert other.lr_scheduler.best == trainer.lr_scheduler.best


def test_fractions_are_nested_seeded_identical_and_sized(planned_target, tmp_path):
    cases = [f"case_{i:03d}" for i in range(150)]
    train, val = cases[:100], cases[100:]
    json.dump([{"train": train, "val": val}], open(tmp_path / "splits_final.json", "w"))
    subsets = {}
    for prefix in ("nnUNetTrainerSAR", "nnUNetTrainer"):
        for k in FRACTIONS:
            t = _trainer(f"{prefix}_frac{k}")
            t.preprocessed_dataset_folder_base = str(tmp_path)  # the fake split; the real dataset is untouched
            tr, va = t.do_split()
            assert va == val and set(tr) <= set(train) and len(set(tr)) == len(tr)
            assert len(tr) == 100 // k
            subsets[prefix, k] = tr
    for k in FRACTIONS:
        assert subsets["nnUNetTrainerSAR", k] == subsets["nnUNetTrainer", k]
    for big, small in zip(FRACTIONS, FRACTIONS[1:]):
        assert set(subsets["nnUNetTrainer", small]) < set(subsets["nnUNetTrainer", big])
    from nnunet_sar.finetuning import nested_fraction
    assert nested_fraction(train, 2) == subsets["nnUNetTrainer", 2]  # seeded: the same again
    assert nested_fraction(train, 2, seed=1) != subsets["nnUNetTrainer", 2]
    assert nested_fraction(train[:3], 50) and len(nested_fraction(train[:3], 50)) == 1  # at least one case
    assert nested_fraction(reversed(train), 5) == subsets["nnUNetTrainer", 5]  # order of the split file irrelevant


def test_paper_plateau_never_reads_the_scored_cases(planned_target, tmp_path):
    """*_paperFT: ReduceLROnPlateau steps on nnU-Net's per-epoch validation loss, so that validation must
    be carved from the fold's training cases (seeded, recorded), disjoint from the cases that the final
    validation scores (with nnunet_sar_split: the test cases). With TrainingFraction it is carved from
    the fraction."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_sar.finetuning import PaperFineTuning, TrainingFraction, nested_fraction
    cases = [f"case_{i:03d}" for i in range(150)]
    train, val = cases[:100], cases[100:]
    json.dump([{"train": train, "val": val}], open(tmp_path / "splits_final.json", "w"))
    plain = _trainer("nnUNetTrainer_paperFT")
    combined = type("nnUNetTrainer_paperFT_frac2", (PaperFineTuning, TrainingFraction, nnUNetTrainer),
                    {"fraction_denominator": 2})({**plain.plans_manager.plans, "continue_training": False}, "3d_fullres",
                                                 0, plain.dataset_json, torch.device("cpu"))
    seen = {}
    for name, t, n_train in (("plain", plain, 100), ("frac2", combined, 50)):
        t.preprocessed_dataset_folder_base = str(tmp_path)  # the fake split; the real dataset is untouched
        t.output_folder = str(tmp_path / name)
        dataset_tr, dataset_plateau = t.get_tr_and_val_datasets()
        _, scored = t.do_split()  # what perform_actual_validation scores
        tr, plateau = list(dataset_tr.identifiers), list(dataset_plateau.identifiers)
        assert scored == val and not set(plateau) & set(scored) and not set(tr) & set(scored)
        assert not set(tr) & set(plateau) and len(plateau) == n_train // 5 and len(tr) + len(plateau) == n_train
        recorded = json.load(open(tmp_path / name / "plateau_split.json"))
        assert recorded["plateau_validation"] == plateau and recorded["train"] == tr and recorded["scored_validation"] == val
        with open(t.log_file) as f:
            assert f"validation loss of {n_train // 5} of the {n_train} training cases" in f.read()
        seen[name] = plateau
    assert set(seen["frac2"]) < set(nested_fraction(train, 2))
    again = _trainer("nnUNetTrainer_paperFT")
    again.preprocessed_dataset_folder_base, again.output_folder = str(tmp_path), str(tmp_path / "again")
    assert list(again.get_tr_and_val_datasets()[1].identifiers) == seen["plain"]  # seeded


# ------------------------------------------------------------------------------ multi-channel targets
def test_single_channel_checkpoint_adapts_to_four_channels(planned_target):
    from nnunet_sar.checkpoint import adapt_input_channels
    from nnunet_sar.network import build_network, build_pretraining_network, load_plans, nnunet_weights
    pm, cm, _ = load_plans(TARGET)
    torch.manual_seed(0)
    weights = nnunet_weights(build_pretraining_network(pm, cm, 1).state_dict())
    net = build_network(pm, cm, 4, 2)
    key = "encoder.stages.0.0.convs.0.conv.weight"
    adapted, keys = adapt_input_channels(weights, net)
    assert key in keys and all(weights[k].shape[1] == 1 for k in keys)
    assert all(adapted[k].shape == net.state_dict()[k].shape for k in keys)
    for c in range(4):
        assert torch.allclose(adapted[key][:, c:c + 1], weights[key] / 4)
    assert all(torch.equal(adapted[k], weights[k]) for k in weights if k not in keys)
    # a 4-channel input of identical images gives the pre-trained first convolution's response
    x = torch.rand(1, 1, 8, 8, 8)
    conv = torch.nn.functional.conv3d
    assert torch.allclose(conv(x.repeat(1, 4, 1, 1, 1), adapted[key], padding=1), conv(x, weights[key], padding=1), atol=1e-5)
    # everything but the seg layers then fits the 4-channel network
    from nnunet_sar.checkpoint import transferable_mismatches
    assert transferable_mismatches(net, weights) and not transferable_mismatches(net, adapted)
    # a checkpoint that already fits is left alone
    same, none = adapt_input_channels(net.state_dict(), net)
    assert none == []


# ------------------------------------------------------------------------------------------- splits
def test_random_split_holds_out_a_third(planned_target):
    from nnunet_sar import SARError
    from nnunet_sar.commands.datasets import raw_case_ids, write_random_split
    from nnunet_sar.network import preprocessed_folder
    fname = join(preprocessed_folder(TARGET), "splits_final.json")
    before = open(fname).read() if isfile(fname) else None
    try:
        if before is not None:
            os.remove(fname)
        test = write_random_split(TARGET, (2, 1), seed=1, trials=5)
        ids = raw_case_ids(TARGET)
        splits = json.load(open(fname))
        assert len(splits) == 5 and all(s == splits[0] for s in splits)
        assert splits[0]["val"] == test and len(test) == round(len(ids) / 3)
        assert sorted(splits[0]["train"] + test) == ids and not set(test) & set(splits[0]["train"])
        assert write_random_split(TARGET, (2, 1), seed=1, trials=5) == test  # same seed, same file: fine
        with pytest.raises(SARError, match="--overwrite"):
            write_random_split(TARGET, (2, 1), seed=2)
    finally:
        if before is None:
            os.remove(fname)
        else:
            open(fname, "w").write(before)


# ------------------------------------------------------------------------------------------- converters
def _img(fname, array, spacing=(1.0, 1.0, 1.0)):
    import SimpleITK as sitk
    im = sitk.GetImageFromArray(array)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(fname))


def _fake_brats(root, cases=(("HGG", "Brats18_A_1"), ("HGG", "Brats18_A_2"), ("LGG", "Brats18_B_1"))):
    rng = np.random.default_rng(0)
    for grade, case in cases:
        d = root / grade / case
        d.mkdir(parents=True)
        for s in ("t1", "t1ce", "t2", "flair"):
            _img(d / f"{case}_{s}.nii.gz", rng.random((6, 7, 8)).astype(np.float32))
        seg = np.zeros((6, 7, 8), np.uint8)
        seg[1:3, 2:4, 3:5] = 4
        seg[3, 3, 3] = 1
        seg[4, 4, 4] = 2
        _img(d / f"{case}_seg.nii.gz", seg)
    return root


def test_convert_brats2018_target_and_source(tmp_path, nnunet_folders, capsys):
    import SimpleITK as sitk
    from nnunet_sar.commands.datasets import main_convert_brats2018
    from nnunet_sar.pretraining.sources import list_source_images
    brats = _fake_brats(tmp_path / "BRATS")
    raw = nnunet_folders["nnUNet_raw"]
    main_convert_brats2018(["-i", str(brats), "-d", "851"])
    out = join(raw, "Dataset851_BraTS2018FLAIR")
    dj = json.load(open(join(out, "dataset.json")))
    assert dj["channel_names"] == {"0": "FLAIR"} and dj["labels"] == {"background": 0, "tumor": 1}
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    assert sorted(os.listdir(join(out, "imagesTr")))[0] == "Brats18_A_1_0000.nii.gz"
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(brats / "HGG/Brats18_A_1/Brats18_A_1_flair.nii.gz")))
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(join(out, "imagesTr", "Brats18_A_1_0000.nii.gz"))), flair)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(join(out, "labelsTr", "Brats18_B_1.nii.gz")))
    assert set(np.unique(seg)) == {0, 1} and seg.sum() == 8 + 2
    # as a pre-training source: 4 sequences, no labels, test cases excluded; sources.py reads it
    splits = tmp_path / "splits_final.json"
    json.dump([{"train": ["Brats18_A_1", "Brats18_A_2"], "val": ["Brats18_B_1"]}], open(splits, "w"))
    main_convert_brats2018(["-i", str(brats), "-d", "852", "--as-source", "--exclude-from", str(splits)])
    src = join(raw, "Dataset852_BraTS2018src")
    assert json.load(open(join(src, "dataset.json")))["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert not os.path.exists(join(src, "labelsTr"))
    vols = list_source_images("Dataset852_BraTS2018src")
    assert len(vols) == 8 and {v[2] for v in vols} == {"Brats18_A_1", "Brats18_A_2"}
    assert {v[4] for v in vols} == {"MRI"} and sorted({v[3] for v in vols}) == [0, 1, 2, 3]
    # clear one-line errors; a corrupt file stops --overwrite before the dataset it would replace is removed
    broken = brats / "HGG/Brats18_A_2/Brats18_A_2_seg.nii.gz"
    good = broken.read_bytes()
    broken.write_bytes(good[:40])
    with pytest.raises(SystemExit) as e:
        main_convert_brats2018(["-i", str(brats), "-d", "851", "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "cannot read" in err and str(broken) in err and err.count("\n") == 0
    assert json.load(open(join(out, "dataset.json")))["numTraining"] == 3 and len(os.listdir(join(out, "labelsTr"))) == 3
    broken.write_bytes(good)
    os.remove(brats / "LGG/Brats18_B_1/Brats18_B_1_seg.nii.gz")
    with pytest.raises(SystemExit) as e:
        main_convert_brats2018(["-i", str(brats), "-d", "853"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "LGG/Brats18_B_1/Brats18_B_1_seg.nii.gz" in err
    with pytest.raises(SystemExit):
        main_convert_brats2018(["-i", str(tmp_path / "nowhere"), "-d", "853"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_convert_brats2018(["-i", str(tmp_path), "-d", "853"])
    assert "neither HGG/ nor LGG/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_convert_brats2018(["-i", str(brats), "-d", "854", "--as-source", "--exclude", "Brats18_X"])
    assert "Brats18_X" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the id is taken
        main_convert_brats2018(["-i", str(brats), "-d", "852", "-n", "Other", "--as-source"])
    assert "already used" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["LUNA16", "LiTS", "MSD"])
def test_convert_source(tmp_path, nnunet_folders, capsys, layout):
    import SimpleITK as sitk
    from nnunet_sar.commands.datasets import main_convert_source
    from nnunet_sar.pretraining.sources import list_source_images
    d = tmp_path / layout
    arr = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    if layout == "LUNA16":
        for k in (0, 1, 7):
            (d / f"subset{k}").mkdir(parents=True)
            _img(d / f"subset{k}" / f"1.3.6.1.{k}.mhd", arr)
        names, ending, mod = ["1.3.6.1.0", "1.3.6.1.1"], ".nii.gz", "CT"  # subsets 0-6 by default (the paper's 623)
    elif layout == "LiTS":
        (d / "batch1").mkdir(parents=True)
        for i in (0, 1, 2):
            _img(d / "batch1" / f"volume-{i}.nii", arr)
            _img(d / "batch1" / f"segmentation-{i}.nii", arr * 0)
        names, ending, mod = ["volume-0", "volume-1", "volume-2"], ".nii", "CT"
    else:
        (d / "imagesTr").mkdir(parents=True)
        (d / "labelsTr").mkdir()
        (d / "imagesTs").mkdir()
        _img(d / "imagesTr" / "la_003.nii.gz", arr)
        _img(d / "imagesTs" / "la_001.nii.gz", arr)  # unlabeled test images count (Heart: 20 + 10 = 30 cases)
        (d / "imagesTr" / "._la_003.nii.gz").write_bytes(b"\0")  # macOS resource fork shipped with MSD
        names, ending, mod = ["la_001", "la_003"], ".nii.gz", "MRI"
    did = {"LUNA16": 861, "LiTS": 862, "MSD": 863}[layout]
    main_convert_source(["-i", str(d), "-d", str(did), "-n", layout, "-m", mod.lower()])
    out = join(nnunet_folders["nnUNet_raw"], f"Dataset{did}_{layout}")
    assert capsys.readouterr().out.strip() == f"wrote {out}: {len(names)} cases"
    dj = json.load(open(join(out, "dataset.json")))
    assert dj["channel_names"] == {"0": mod} and dj["file_ending"] == ending
    assert sorted(os.listdir(join(out, "imagesTr"))) == [f"{n}_0000{ending}" for n in names]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(join(out, "imagesTr", f"{names[0]}_0000{ending}"))), arr)
    vols = list_source_images(f"Dataset{did}_{layout}")
    assert [v[2] for v in vols] == names and {v[4] for v in vols} == {mod}
    if layout == "LUNA16":
        main_convert_source(["-i", str(d), "-d", "865", "-n", "LUNA16b", "-m", "CT", "--subsets", "1,7"])
        assert sorted(os.listdir(join(nnunet_folders["nnUNet_raw"], "Dataset865_LUNA16b", "imagesTr"))) == \
            ["1.3.6.1.1_0000.nii.gz", "1.3.6.1.7_0000.nii.gz"] and "2 cases" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            main_convert_source(["-i", str(d), "-d", "864", "-n", "X", "-m", "CT", "--subsets", "8-9"])
        err = capsys.readouterr().err.strip()
        assert "--subsets 8 9" in err and "[0, 1, 7]" in err and "\n" not in err
        os.remove(d / "subset1" / "1.3.6.1.1.raw")
        with pytest.raises(SystemExit):
            main_convert_source(["-i", str(d), "-d", "864", "-n", "X", "-m", "CT"])
        err = capsys.readouterr().err.strip()
        assert "1.3.6.1.1.raw" in err and "\n" not in err
        with pytest.raises(SystemExit):
            main_convert_source(["-i", str(tmp_path / "LiTS" / "missing"), "-d", "864", "-n", "X", "-m", "CT"])
        assert "does not exist" in capsys.readouterr().err
        (tmp_path / "empty").mkdir()
        with pytest.raises(SystemExit):
            main_convert_source(["-i", str(tmp_path / "empty"), "-d", "864", "-n", "X", "-m", "CT"])
        assert "no images in" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- report
DICE = {  # trainer -> fold -> [(case, tumor Dice, tumor volume in voxels, organ Dice)]
    "nnUNetTrainerSAR": {0: [("a", 0.9, 100, 0.8), ("b", 0.7, 1000, 0.6), ("c", 0.5, 10, 0.9)],
                         1: [("d", 0.8, 5000, 0.7), ("e", float("nan"), 0, 0.5), ("f", 0.6, 50, 0.4)]},
    "nnUNetTrainer": {0: [("a", 0.6, 100, 0.7), ("b", 0.5, 1000, 0.5), ("c", 0.1, 10, 0.8)],
                      1: [("d", 0.7, 5000, 0.6), ("e", 0.0, 0, 0.4), ("f", 0.2, 50, 0.3)]},
    "nnUNetTrainerSAR_frac2": {0: [("a", 0.5, 100, 0.5)], 1: [("d", 0.3, 5000, 0.1)]},
    "nnUNetTrainer_frac2": {0: [("a", 0.4, 100, 0.2)], 1: [("d", 0.2, 5000, 0.2)]},
}


def _fake_results(results_root, dataset="Dataset871_Fake"):
    for t, folds in DICE.items():
        base = join(results_root, dataset, f"{t}__nnUNetPlans__3d_fullres")
        os.makedirs(base, exist_ok=True)
        json.dump({"labels": {"background": 0, "organ": 1, "tumor": 2}}, open(join(base, "dataset.json"), "w"))
        for f, cases in folds.items():
            os.makedirs(join(base, f"fold_{f}", "validation"))
            per_case = [{"reference_file": f"/gt/{c}.nii.gz", "prediction_file": f"/pred/{c}.nii.gz",
                         "metrics": {"1": {"Dice": od, "n_ref": 500}, "2": {"Dice": None if np.isnan(td) else td, "n_ref": v}}}
                        for c, td, v, od in cases]
            json.dump({"metric_per_case": per_case}, open(join(base, f"fold_{f}", "validation", "summary.json"), "w"))
            with open(join(base, f"fold_{f}", "training_log_2024_1_1_00_00_00.txt"), "w") as log:
                for e in range(3):
                    log.write(f"2024-01-01 00:00:00.000000: Epoch {e}\n2024-01-01 00:00:00.000000: "
                              f"train_loss {-0.1 * (e + 1) - 0.01 * f:.4f}\n")
    return dataset


def test_report_numbers_equal_a_computation_by_hand(tmp_path, nnunet_folders, monkeypatch):
    from scipy import stats
    from nnunet_sar.commands.report import run
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    _fake_results(str(tmp_path / "results"))
    out = tmp_path / "report"
    r = run(["-d", "871", "-tr", *DICE, "--folds", "0", "1", "--strata-thresholds", "60", "2000", "-o", str(out)])
    # by hand. SAR tumor per fold: fold 0 mean(.9,.7,.5)=.7, fold 1 mean(.8,.6)=.7 (NaN left out)
    t = r["table"]["nnUNetTrainerSAR"]
    assert t["tumorall"][:2] == pytest.approx((0.7, 0.0))
    assert t["organ"][:2] == pytest.approx((np.mean([0.7667, 0.5333]), np.std([0.76667, 0.53333], ddof=1)), abs=1e-3)
    # strata (S < 60 <= M < 2000 <= L): S = c (10, fold 0), f (50, fold 1); M = a, b (fold 0); L = d (fold 1)
    assert t["tumorS"][:3] == pytest.approx((np.mean([0.5, 0.6]), np.std([0.5, 0.6], ddof=1), 2))
    assert t["tumorM"][:3] == pytest.approx((0.8, 0.0, 1))
    assert t["tumorL"][:3] == pytest.approx((0.8, 0.0, 1))
    s = r["table"]["nnUNetTrainer"]
    assert s["tumorall"][:2] == pytest.approx((np.mean([0.4, 0.3]), np.std([0.4, 0.3], ddof=1)))
    # t-test SAR vs scratch on per-fold values
    tt = {x["column"]: x for x in r["ttests"] if x["other"] == "nnUNetTrainer"}
    ref = stats.ttest_ind([0.7, 0.7], [0.4, 0.3])
    assert tt["tumorall"]["p"] == pytest.approx(ref.pvalue) and tt["tumorall"]["t"] == pytest.approx(ref.statistic)
    # hand-computed t statistic: pooled variance
    a, b = np.array([0.7, 0.7]), np.array([0.4, 0.3])
    sp = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    assert tt["tumorall"]["t"] == pytest.approx((a.mean() - b.mean()) / (sp * np.sqrt(1 / len(a) + 1 / len(b))))
    assert not [x for x in r["ttests"] if "frac" in x["other"]]
    # Table 4: foreground mean (mean of organ and tumor per fold) per fraction; 1/1 = the base trainer
    eff = r["efficiency"]
    assert eff["nnUNetTrainerSAR"][2][0] == pytest.approx(np.mean([(0.5 + 0.5) / 2, (0.1 + 0.3) / 2]))
    assert eff["nnUNetTrainer"][2][0] == pytest.approx(np.mean([(0.2 + 0.4) / 2, (0.2 + 0.2) / 2]))
    assert eff["nnUNetTrainerSAR"][1][0] == pytest.approx(np.mean([(0.7 + 0.7667) / 2, (0.7 + 0.5333) / 2]), abs=1e-3)
    # files
    for f in ("report.md", "dice.csv", "ttests.csv", "per_case.csv", "data_efficiency.csv", "loss_curves.png", "loss_curves.csv"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    assert "S < 60 ≤ M < 2000 ≤ L" in md and "70.00 ± 0.00" in md and "voxels" in md
    rows = list(csv.DictReader(open(out / "dice.csv")))
    assert float(rows[0]["tumorall_mean"]) == pytest.approx(0.7)
    curves = list(csv.DictReader(open(out / "loss_curves.csv")))
    assert float(curves[2]["nnUNetTrainerSAR"]) == pytest.approx(np.mean([-0.3, -0.31]))
    # default strata: tertiles of the distinct cases' tumor volumes (e has no tumor)
    r2 = run(["--summaries", *(f"X={tmp_path}/results/Dataset871_Fake/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_{f}/validation/summary.json"
                                 for f in (0, 1)), "-o", str(tmp_path / "r2")])
    assert r2["thresholds"] == pytest.approx(tuple(np.percentile([100, 1000, 10, 5000, 50], [100 / 3, 200 / 3])))
    assert "2all" in r2["columns"]  # no dataset.json: class keys, the last one stratified


def test_report_without_results_says_what_to_run(tmp_path, monkeypatch, capsys):
    from nnunet_sar.commands.report import main
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    (tmp_path / "results" / "Dataset872_Empty").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main(["-d", "872", "-tr", "nnUNetTrainerSAR", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "nnUNetv2_train 872 3d_fullres FOLD -tr nnUNetTrainerSAR" in err and "\n" not in err.strip()
