"""Every trainer of Tables 2-4 inside nnU-Net: found by nnU-Net's lookup, initialised from the checkpoint of
its own pre-training variant (found where ``nnunet_sar_pretrain`` writes it, no override), trained for a
few iterations by nnU-Net's ``run_training`` and loaded again by nnU-Net's predictor to segment a test
case. Then ``nnunet_sar_report`` reads Dice and loss curves from these real result folders."""
import csv
import os
from os.path import isfile, join

import numpy as np
import pytest
import torch
from conftest import SOURCE_IDS, TARGET

pytestmark = pytest.mark.slow  # minutes: every trainer of Tables 2-4 trains and predicts

FRACTIONS = (2, 5, 10, 20, 50)
VARIANT_OF = {  # trainer -> the pre-training variant it starts from (None: from scratch)
    "nnUNetTrainerSAR": "sar", "nnUNetTrainerGenesis": "genesis", "nnUNetTrainerSAR_SAonly": "sa",
    "nnUNetTrainerSAR_MIALonly": "mial", "nnUNetTrainerSAR_scale2": "scale2", "nnUNetTrainerSAR_scale4": "scale4",
    "nnUNetTrainerSAR_scale8": "scale8", "nnUNetTrainerSAR_paperFT": "sar", "nnUNetTrainer_paperFT": None,
    **{f"nnUNetTrainerSAR_frac{k}": "sar" for k in FRACTIONS}, **{f"nnUNetTrainer_frac{k}": None for k in FRACTIONS},
    "nnUNetTrainerSAR_noWarmup": "sar", "nnUNetTrainerSAR_fullTransfer": "sar", "nnUNetTrainerSAR_sawtooth": "sar",
    "nnUNetTrainerSAR_fullTransfer_noWarmup": "sar",
}
FULL_TRANSFER = {"nnUNetTrainerSAR_paperFT", "nnUNetTrainerSAR_fullTransfer", "nnUNetTrainerSAR_sawtooth",
                 "nnUNetTrainerSAR_fullTransfer_noWarmup"}  # the others: encoder only (the default)
NO_WARMUP = {"nnUNetTrainerSAR_paperFT", "nnUNetTrainerSAR_noWarmup", "nnUNetTrainerSAR_fullTransfer_noWarmup"}
DECODER_KEY = "decoder.transpconvs.0.weight"
FIRST_CONV = "encoder.stages.0.0.convs.0.conv.weight"
REPORTED = ("nnUNetTrainerSAR", "nnUNetTrainer_paperFT", "nnUNetTrainerSAR_frac2")  # also validated, as nnUNetv2_train does


@pytest.fixture(scope="module")
def variant_checkpoints(tiny_plans):
    """One real (one-iteration) pre-training run per variant, in the session's nnUNet_results."""
    from nnunet_sar.pretraining.loop import PretrainSettings, SARPretrainer
    out = {}
    for variant in sorted(set(VARIANT_OF.values()) - {None}):
        t = SARPretrainer(PretrainSettings(dataset=TARGET, sources=[str(i) for i in SOURCE_IDS], variant=variant,
                                           plans_identifier=tiny_plans, device="cpu", epochs=1, iters_per_epoch=1,
                                           batch_size=8, val_cubes_per_volume=[1, 1, 1], seed=len(out)))
        t.initialize()
        t.run_training()
        out[variant] = join(t.output_folder, "checkpoint_final.pth")
    return out


@pytest.fixture(scope="module")
def trained(tiny_plans, variant_checkpoints, nnunet_folders):
    """Each trainer: initialise (weights recorded), train 1 epoch of 2 iterations, predict a test case."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args
    image, props = SimpleITKIO().read_images([join(nnunet_folders["nnUNet_raw"], TARGET, "imagesTs", "case_006_0000.nii.gz")])
    runs = {}
    for name in VARIANT_OF:
        trainer = get_trainer_from_args(TARGET, "3d_fullres", 0, name, tiny_plans, device=torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
        if getattr(trainer, "warmup", None) == "sawtooth":  # both iterations in the decoder-only phase (W = 2)
            trainer.warmup_fraction = 1.0
        trainer.initialize()
        start = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        trainer.run_training()
        if name in REPORTED:
            trainer.perform_actual_validation(False)
        predictor = nnUNetPredictor(tile_step_size=1.0, use_mirroring=False, device=torch.device("cpu"),
                                    perform_everything_on_device=False, verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(os.path.dirname(trainer.output_folder), (0,), "checkpoint_final.pth")
        with open(trainer.log_file) as f:
            log = f.read()
        runs[name] = dict(start=start, folder=trainer.output_folder, log=log, trainer_class=predictor.trainer_name, seg=predictor.predict_single_npy_array(image, props),
                          final=torch.load(join(trainer.output_folder, "checkpoint_final.pth"), map_location="cpu",
                                           weights_only=False))
    return dict(runs=runs, image=image)


@pytest.mark.parametrize("name", list(VARIANT_OF))
def test_trainer_starts_from_its_variant_trains_and_predicts(trained, variant_checkpoints, name):
    run = trained["runs"][name]
    variant = VARIANT_OF[name]
    # initialised from its own variant's checkpoint (every other checkpoint differs in the first conv)
    loaded = {v: torch.equal(run["start"][FIRST_CONV], torch.load(f, weights_only=False)["network_weights"][FIRST_CONV])
              for v, f in variant_checkpoints.items()}
    assert loaded == {v: v == variant for v in variant_checkpoints}
    if variant:
        ckpt = torch.load(variant_checkpoints[variant], weights_only=False)["network_weights"]
        encoder_only = name not in FULL_TRANSFER
        assert torch.equal(run["start"][DECODER_KEY], ckpt[DECODER_KEY]) != encoder_only  # decoder: transferred or fresh
        what = "the encoder only; the decoder keeps nnU-Net's initialisation" if encoder_only else "all but the seg layers"
        assert f"pre-trained tensors ({what}) from {variant_checkpoints[variant]}" in run["log"]
        assert "SAR transfer check (" in run["log"]  # the check's figures, read from beside the checkpoint
        assert ("learning-rate warm-up" in run["log"]) == (name not in NO_WARMUP)
    # trained: nnU-Net's checkpoint_final of this trainer, one finite training loss, weights moved
    final = run["final"]
    assert final["trainer_name"] == name and final["current_epoch"] == 1
    assert len(final["logging"]["train_losses"]) == 1 and np.isfinite(final["logging"]["train_losses"][0])
    moved = DECODER_KEY if name == "nnUNetTrainerSAR_sawtooth" else FIRST_CONV  # sawtooth: encoder waits (lr 0)
    assert not torch.equal(final["network_weights"][moved], run["start"][moved])
    if name == "nnUNetTrainerSAR_sawtooth":
        assert torch.equal(final["network_weights"][FIRST_CONV], run["start"][FIRST_CONV])
    if "_frac" in name:
        import json
        k = int(name.split("frac")[1])
        n = len(json.load(open(join(os.environ["nnUNet_preprocessed"], TARGET, "splits_final.json")))[0]["train"])
        assert f"Training fraction 1/{k}: {max(1, round(n / k))} of {n} training cases" in run["log"]
    # predicts: nnU-Net's predictor rebuilt this trainer's network from the folder and segmented a test case
    assert run["trainer_class"] == name
    seg = run["seg"]
    assert seg.shape == trained["image"].shape[1:] and set(np.unique(seg)) <= {0, 1}


def test_report_on_real_result_folders(trained, tiny_plans, tmp_path):
    """The report's Dice equals nnU-Net's own summary.json, and its loss curves are the checkpoints' logs."""
    import json
    from nnunet_sar.commands.report import run
    r = run(["-d", TARGET, "-p", tiny_plans, "-tr", *REPORTED, "--folds", "0", "--no-strata", "-o", str(tmp_path)])
    for t in REPORTED:
        folder = trained["runs"][t]["folder"]
        summary = json.load(open(join(folder, "validation", "summary.json")))
        assert r["table"][t]["tumor"][0] == pytest.approx(summary["mean"]["1"]["Dice"])
    curves = list(csv.DictReader(open(tmp_path / "loss_curves.csv")))
    assert len(curves) == 1 and isfile(tmp_path / "loss_curves.png")
    for t in REPORTED:
        assert float(curves[0][t]) == pytest.approx(trained["runs"][t]["final"]["logging"]["train_losses"][0], rel=1e-5)
