"""Pre-training objectives as plug-ins (issue 13): every objective runs in the one loop, writes a checkpoint
that records what it trained and that its fine-tuning trainer loads, passes the transfer check, and (slow
tests) learns its proxy task on phantoms above chance. Plus the arithmetic of SAR's objective, the default
learning-rate groups and the two places where cube transforms can run."""
import json
import os
from os.path import isfile, join

import pytest
import torch
from conftest import SOURCE_IDS, TARGET
from nnunet_sar.pretraining.cubes import transform_batch

OBJECTIVES = ("sar", "genesis", "mae", "rot", "rpl", "jigsaw", "cpc")
TRAINER = {"sar": "nnUNetTrainerSAR_demo", "genesis": "nnUNetTrainerGenesis_demo", "mae": "nnUNetTrainerMAE_demo",
           "rot": "nnUNetTrainerRot_demo", "rpl": "nnUNetTrainerRPL_demo", "jigsaw": "nnUNetTrainerJigsaw_demo",
           "cpc": "nnUNetTrainerCPC_demo"}
SMALL = {"mae": {"block_size": 4}}  # options for the 16^3 cubes of these tests


@pytest.fixture
def results(tmp_path):
    old = os.environ["nnUNet_results"]
    os.environ["nnUNet_results"] = str(tmp_path)  # nnunetv2.paths reads the environment on access
    yield tmp_path
    os.environ["nnUNet_results"] = old


def _trainer(tiny_plans, objective="sar", sources=SOURCE_IDS, **kw):
    """A seeded tiny run of ``objective`` on the session's phantom sources (or ``sources``)."""
    from nnunet_sar.pretraining.loop import PretrainSettings, SARPretrainer
    kw = {"batch_size": 8, "patch_size": [16, 16, 16], "lr_unet": 0.1, "epochs": 1, "iters_per_epoch": 2,
          "val_cubes_per_volume": [1, 1, 1], "objective_options": SMALL.get(objective, {}), "val_fraction": 0.25, **kw}
    s = PretrainSettings(dataset=TARGET, sources=[str(i) for i in sources], plans_identifier=tiny_plans, device="cpu",
                         objective=objective, **kw)
    return SARPretrainer(s)


# --------------------------------------------------------------------------- arithmetic and defaults
def test_sar_objective_arithmetic_on_hand_made_inputs():
    """total = beta * L_res + alpha * L_scale + L_adv; the plateau follows beta * L_res + alpha * L_scale; L_res
    through a sigmoid in [0, 1] (absolute, unit), linear and in the window's units (scale^2) under --intensity
    nnunet; the default standardised output read back with each clean cube's mean and std."""
    from nnunet_sar.pretraining.loop import PretrainSettings
    from nnunet_sar.pretraining.objectives.sar import SAR, sar_terms
    unit = SAR(PretrainSettings(dataset="", sources=[], restoration_target="absolute"), [2, 2, 2])
    restored = torch.zeros(2, 1, 2, 2, 2)            # sigmoid(0) = 0.5 everywhere
    target = torch.ones(2, 1, 2, 2, 2)               # L_res = (1 - 0.5)^2 = 0.25
    res = unit.restoration_error(unit.restoration(restored, target), target)
    assert float(res) == pytest.approx(0.25)
    nnunet = SAR(PretrainSettings(dataset="", sources=[], intensity="nnunet", restoration_target="absolute"),
                 [2, 2, 2])
    maps = torch.tensor([[0, 1, 0, 2.0, 0], [0, 1, 0, 0.5, 0]])  # scales 2 and 0.5: errors x 4 and x 0.25
    linear = nnunet.restoration_error(nnunet.restoration(restored, target), target, maps)  # (1 - 0)^2 per voxel
    assert float(linear) == pytest.approx((4 + 0.25) / 2)
    mask = torch.zeros_like(target)
    mask[0, 0, 0] = 1  # 4 voxels of the first cube
    assert float(nnunet.restoration_error(restored, target, maps, mask)) == pytest.approx(4.0)
    # standardised (the default): output 0 is each clean cube's mean; the standardised cube restores it exactly;
    # an error of 1 standard deviation everywhere costs the cube's variance (window units, unbiased std)
    std = SAR(PretrainSettings(dataset="", sources=[]), [2, 2, 2])
    assert std.s.restoration_target == "standardised"
    clean = torch.tensor([0., 0., 0., 0., 1., 1., 1., 1.]).view(1, 1, 2, 2, 2) * torch.tensor([1., 3.]).view(2, 1, 1, 1, 1)
    mean, sd = clean.flatten(1).mean(1).view(2, 1, 1, 1, 1), clean.flatten(1).std(1).view(2, 1, 1, 1, 1)
    assert torch.allclose(std.restoration(torch.zeros_like(clean), clean), mean.expand_as(clean))
    assert torch.allclose(std.restoration((clean - mean) / sd, clean), clean, atol=1e-6)
    off = std.restoration_error(std.restoration((clean - mean) / sd + 1, clean), clean)
    assert float(off) == pytest.approx(float((sd ** 2).mean()), rel=1e-5)
    scale_logits = torch.tensor([[0., 0., 0.], [0., 0., 0.]])  # uniform over 3: L_scale = ln 3
    modality_logits = torch.tensor([[0., 0.], [0., 0.]])       # uniform over 2: L_adv = ln 2
    t = sar_terms(res, scale_logits, modality_logits, torch.tensor([0, 2]), torch.tensor([1, 0]), alpha=2.0, beta=10.0)
    ln2, ln3 = torch.log(torch.tensor(2.)), torch.log(torch.tensor(3.))
    assert t["res"] == pytest.approx(0.25) and t["scale"] == pytest.approx(float(ln3)) and t["adv"] == pytest.approx(float(ln2))
    assert t["total"] == pytest.approx(10 * 0.25 + 2 * float(ln3) + float(ln2))
    assert t["scheduled"] == pytest.approx(10 * 0.25 + 2 * float(ln3))
    confident = torch.tensor([[9., 0., 0.], [0., 0., 9.]])  # both right: accuracy 1
    assert sar_terms(res, confident, None, torch.tensor([0, 2]), None, 1., 1.)["scale_acc"] == 1
    alone = sar_terms(res, None, None, None, None, alpha=5.0, beta=3.0)  # genesis: restoration only
    assert set(alone) == {"res", "total", "scheduled"} and alone["total"] == pytest.approx(0.75)


def test_default_learning_rate_groups(tiny_plans, results):
    """SAR: one SGD group per player (U-Net 0.01, the measured default; S 0.1, M 1e-3 as the paper; momentum
    0.9); an encoder objective: the U-Net and its one head."""
    from nnunet_sar.pretraining.loop import PretrainSettings, SARPretrainer
    t = SARPretrainer(PretrainSettings(dataset=TARGET, sources=[str(i) for i in SOURCE_IDS], plans_identifier=tiny_plans,
                                       device="cpu", batch_size=8, patch_size=[16, 16, 16], val_cubes_per_volume=[1, 1, 1]))
    t.initialize()
    groups = {g["name"]: (g["lr"], g["momentum"]) for g in t.optimizer.param_groups}
    assert groups == {"unet": (0.01, 0.9), "scale_head": (0.1, 0.9), "discriminator": (1e-3, 0.9)}
    n = {g["name"]: sum(p.numel() for p in g["params"]) for g in t.optimizer.param_groups}
    assert n["unet"] == sum(p.numel() for p in t.network.unet.parameters())
    rot = _trainer(tiny_plans, "rot")
    rot.initialize()
    assert {g["name"]: g["lr"] for g in rot.optimizer.param_groups} == {"unet": 0.1, "head": 0.01}


def test_adam_takes_its_own_learning_rates_unless_given(tiny_plans, results):
    """--optimizer adam: Adam over the same groups at its own rates (U-Net 1e-3, S 1e-3, M 1e-4); a rate given
    on the command line wins, and SGD's rates, the paper preset's included, never reach Adam."""
    from nnunet_sar.pretraining.cli import settings_from_args
    from nnunet_sar.pretraining.loop import SARPretrainer
    from nnunet_sar.pretraining.settings import ADAM_LRS
    base = ["-d", TARGET, "-p", tiny_plans, "--sources", *map(str, SOURCE_IDS), "--batch-size", "8", "--patch-size",
            "16", "16", "16", "--val-cubes-per-volume", "1", "1", "1", "--val-fraction", "0.25", "-device", "cpu"]
    s, _ = settings_from_args(base + ["--optimizer", "adam", "--lr-disc", "3e-4"])
    t = SARPretrainer(s)
    t.initialize()
    assert type(t.optimizer) is torch.optim.Adam
    assert {g["name"]: g["lr"] for g in t.optimizer.param_groups} == {"unet": 1e-3, "scale_head": 1e-3,
                                                                       "discriminator": 3e-4}
    paper, _ = settings_from_args(base + ["--optimizer", "adam", "--preset", "paper"])
    assert (paper.lr_unet, paper.lr_scale, paper.lr_disc) == tuple(ADAM_LRS.values())
    assert not set(ADAM_LRS) & set(paper.preset_values)  # the preset's SGD rates were not applied
    sgd, _ = settings_from_args(base)
    assert (sgd.optimizer, sgd.lr_unet) == ("sgd", 0.01)


@pytest.mark.parametrize("objective", ["sar", "rot"])
def test_transforms_on_the_device_give_the_loaders_cubes(objective, tiny_plans, results):
    """--transform-on device runs the objective's transforms batched in the training step, each cube under the
    seed the loader would have used: the same corrupted (rotated) cubes and labels (here on the CPU, which is how
    CPU tests exercise the accelerator's path)."""
    loader = _trainer(tiny_plans, objective)
    loader.initialize()
    device = _trainer(tiny_plans, objective, transform_on="device")
    device.initialize(overwrite=True)
    assert device.train_cubes.transforms is None and loader.train_cubes.transforms is not None
    keys = list(loader._loader().sampler)[:4]
    made = [loader.train_cubes[k] for k in keys]
    clean = [device.train_cubes[k] for k in keys]
    batch = {k: torch.stack([c[k] for c in clean]) for k in clean[0]}
    out = transform_batch(device.transforms, batch, [device.train_cubes.transform_seed(k) for k in keys])
    assert set(out) == set(made[0])  # labels the transforms add (rot: 'rotation') included
    for k in out:
        assert torch.equal(out[k], torch.stack([m[k] for m in made])), k
    assert not torch.equal(out["image"], batch["image"])  # the transforms did run


# --------------------------------------------------------------------------- every objective, end to end
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_runs_checkpoints_transfers_and_its_trainer_loads_it(objective, tiny_plans, results):
    """One short run per objective: its own run folder, a checkpoint that records the objective and the keys it
    trained (encoder objectives: the encoder's alone), a transfer check that passes, and its nnU-Net trainer
    loading that checkpoint (the encoder alone where the objective trained no more, and saying so)."""
    from nnunet_sar.checkpoint import encoder_keys
    from nnunet_sar.pretraining.objectives import objective_class
    from nnunetv2.run.run_training import get_trainer_from_args
    cls = objective_class(objective)
    t = _trainer(tiny_plans, objective)
    t.initialize()
    t.run_training()
    folder = t.output_folder
    assert folder.endswith(f"nnUNetSARPretrain_{objective}__{tiny_plans}__3d_fullres")
    ckpt = torch.load(join(folder, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["objective"] == objective and ckpt["settings"]["objective"] == objective
    enc = encoder_keys(t.network.unet)
    trained = set(ckpt["trained_keys"])
    if cls.transfers == "encoder":
        assert trained == {k for k in ckpt["network_weights"] if k in enc} and ckpt["heads"]
    else:
        assert trained == set(ckpt["network_weights"])
    r = json.load(open(join(folder, "transfer_check.json")))
    assert r["kind"] == ("restoration" if cls.restores else "encoder")
    if cls.restores:  # two steps restore nothing yet (mae: worse than its blanked input), but the same in both nets
        assert r["finetuning_network"] <= 1.1 * r["pretraining_network"], r
    else:
        assert r["verdict"].startswith("ok"), r
        assert r["encoder_feature_difference"] < 1e-4 and r["finetuning_network"] == pytest.approx(r["pretraining_network"])
    assert isfile(join(folder, "transfer_check.png")) and isfile(join(folder, "progress.png"))
    tr = get_trainer_from_args(TARGET, "3d_fullres", 0, TRAINER[objective], tiny_plans, device=torch.device("cpu"))
    tr.initialize()
    state = tr.network.state_dict()
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.equal(state[key], ckpt["network_weights"][key])
    decoder_key = "decoder.transpconvs.0.weight"
    full = objective == "mae"  # nnUNetTrainerMAE: encoder and decoder; the others the encoder alone
    assert torch.equal(state[decoder_key], ckpt["network_weights"][decoder_key]) == full
    log = open(tr.log_file).read()
    what = "all but the seg layers" if full else "the encoder only; the decoder keeps nnU-Net's initialisation"
    assert f"pre-trained tensors ({what}) from {join(folder, 'checkpoint_final.pth')}" in log
    assert "SAR transfer check (" in log


def test_full_transfer_of_an_encoder_objective_is_refused(tiny_plans, results, monkeypatch):
    """A trainer that would take the decoder of an encoder-only checkpoint (untrained weights) stops and says so."""
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import load_pretrained_into
    from nnunet_sar.network import build_network, load_plans
    t = _trainer(tiny_plans, "rot")
    t.initialize()
    t.run_training()
    pm, cm, _ = load_plans(TARGET, tiny_plans)
    net = build_network(pm, cm, 1, 2, deep_supervision=True)
    with pytest.raises(SARError, match="trained the encoder alone"):
        load_pretrained_into(net, join(t.output_folder, "checkpoint_final.pth"), log=lambda *a: None, parts="all")


def test_cli_objective_flags(tiny_plans):
    """--objective is found by name, its options are --<objective>-<option>, another objective's option fails."""
    from nnunet_sar.pretraining.cli import settings_from_args
    s, _ = settings_from_args(["-d", TARGET, "--sources", "802", "--objective", "mae", "--mae-mask-ratio", "0.6",
                               "-device", "cpu"])
    assert s.objective == "mae" and s.objective_options == {"mask_ratio": 0.6}
    with pytest.raises(SystemExit):
        settings_from_args(["-d", TARGET, "--sources", "802", "--objective", "rot", "--mae-mask-ratio", "0.6"])
    with pytest.raises(SystemExit):
        settings_from_args(["-d", TARGET, "--sources", "802", "--objective", "nonsense"])


def test_jigsaw_permutations_are_fixed_and_far_apart():
    from nnunet_sar.pretraining.objectives.jigsaw import max_hamming_permutations
    a, b = max_hamming_permutations(100, seed=0), max_hamming_permutations(100, seed=0)
    assert (a == b).all() and len({tuple(p) for p in a}) == 100
    d = (a[:, None] != a[None]).sum(-1)
    assert d[~torch.eye(100, dtype=torch.bool).numpy()].min() >= 20  # of 27 tiles; random pairs differ in ~26


# --------------------------------------------------------------------------- learning the proxy tasks
def _oriented_sources(nnunet_folders, folder) -> list:
    """CT and MRI phantom sources with an orientation. The phantoms are ellipsoids in noise, symmetric under
    flips and half turns, so where a tile lies or how a cube was turned is ill-posed on them (measured: rot and
    rpl stayed at chance for 200 steps). These copies add an intensity ramp of another slope along each axis
    (z 3, y 2, x 1 parts; up to half of the window), as real anatomy is not symmetric either."""
    import glob
    import numpy as np
    import SimpleITK as sitk
    from nnunet_sar.phantoms import write_phantom_dataset
    out = []
    for did, modality, (low, high) in ((841, "CT", (-1000, 1000)), (842, "MRI", (0, 4000))):
        raw = write_phantom_dataset(nnunet_folders["nnUNet_raw"], did, f"Oriented{modality}", modality, num_training=6,
                                    shape=(48, 48, 48), seed=did, overwrite=True)
        target = os.path.join(folder, modality)
        os.makedirs(target, exist_ok=True)
        for f in sorted(glob.glob(join(raw, "imagesTr", "*.nii.gz"))):
            image = sitk.ReadImage(f)
            a = sitk.GetArrayFromImage(image).astype(np.float32)
            z, y, x = np.meshgrid(*[np.linspace(0, 1, s) for s in a.shape], indexing="ij")
            o = sitk.GetImageFromArray(a + (high - low) * (3 * z + 2 * y + x) / 12)
            o.CopyInformation(image)
            sitk.WriteImage(o, join(target, os.path.basename(f)))
        out.append(f"{target}:{modality}")
    return out


@pytest.fixture(scope="module")
def oriented(nnunet_folders, tmp_path_factory):
    return _oriented_sources(nnunet_folders, str(tmp_path_factory.mktemp("oriented")))


@pytest.fixture(scope="module")
def tiny3_plans(tiny_plans):
    """The tiny plans with 3 stages (total stride 4): 8^3 tiles keep a 2^3 bottleneck, so the 27 tiles of
    jigsaw and cpc cost what one 24^3 cube does."""
    folder = join(os.environ["nnUNet_preprocessed"], TARGET)
    plans = json.load(open(join(folder, f"{tiny_plans}.json")))
    plans["plans_name"] = "nnUNetPlansTiny3"
    a = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    a["n_stages"] = 3
    for k in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
        a[k] = a[k][:3]
    a["n_conv_per_stage_decoder"] = a["n_conv_per_stage_decoder"][:2]
    json.dump(plans, open(join(folder, "nnUNetPlansTiny3.json"), "w"))
    return "nnUNetPlansTiny3"


# objective -> (run settings, bars on the held-out cubes: mean of the last 4 epochs' accuracy at least `acc`, and
# their loss at least `margin` below the loss of a chance guess, ln(classes)). Measured on this VM (one run each,
# oriented phantoms, these settings): rot accuracy 0.47 (chance 0.10), loss 1.56 (ln 10 = 2.30); rpl 0.078 (1/26 =
# 0.038), loss 3.09 (ln 26 = 3.26); jigsaw 0.18 (0.01), loss 3.76 (ln 100 = 4.61); cpc 0.08 (1/432), loss 4.93
# (ln 432 = 6.07). With labels shuffled against the cubes or a loss that does not train, held-out loss stays at
# ln(classes) or above and accuracy at chance. rpl learns slowest: its bar is on the loss, accuracy only > chance.
LEARNING = {
    "rot": (dict(patch_size=[16, 16, 16]), dict(acc=0.25, margin=0.4)),
    "rpl": (dict(patch_size=[16, 16, 16], cubes_per_volume=[16, 0, 0], val_cubes_per_volume=[16, 0, 0]),
            dict(acc=1 / 26, margin=0.08)),
    "jigsaw": (dict(patch_size=[8, 8, 8], objective_options={"gap": 2}, plans="tiny3"), dict(acc=0.08, margin=0.4)),
    "cpc": (dict(patch_size=[8, 8, 8], plans="tiny3"), dict(acc=0.03, margin=0.4)),
}


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(LEARNING))
def test_encoder_objective_learns_its_proxy_task(objective, tiny_plans, tiny3_plans, oriented, results):
    """200 SGD steps (20 epochs of 10, batch 16, lr 0.01 for U-Net and head; at lr 0.1 these losses diverged)
    on oriented phantoms: on 64 held-out cubes (4 held-out volumes) the proxy task beats chance by the bars of
    LEARNING, and the transfer check finds the same accuracy through nnU-Net's own encoder."""
    import math
    from nnunet_sar.pretraining.objectives import objective_class
    kw, bar = LEARNING[objective]
    kw = {"cubes_per_volume": [8, 8, 0], "val_cubes_per_volume": [8, 8, 0], **kw}
    plans = tiny3_plans if kw.pop("plans", None) == "tiny3" else tiny_plans
    t = _trainer(plans, objective, sources=oriented, epochs=20, iters_per_epoch=10, batch_size=16, lr_unet=0.01,
                 val_fraction=0.34, **kw)
    t.initialize()
    t.run_training()
    metric = objective_class(objective).proxy_metric
    log = t.logger.my_fantastic_logging
    acc, loss = sum(log[f"val_{metric}"][-4:]) / 4, sum(log["val_loss"][-4:]) / 4
    r = json.load(open(join(t.output_folder, "transfer_check.json")))
    chance_loss = -math.log(r["chance"])
    print(objective, "held-out accuracy per epoch:", [round(a, 3) for a in log[f"val_{metric}"]], "loss",
          [round(x, 3) for x in log["val_loss"]], "chance", r["chance"], r["summary"])
    assert acc >= bar["acc"] and acc > r["chance"], (acc, bar, r["chance"])
    assert loss <= chance_loss - bar["margin"], (loss, chance_loss, bar)
    assert r["verdict"].startswith("ok") and r["finetuning_network"] == pytest.approx(r["pretraining_network"]), r


@pytest.mark.slow
def test_mae_restores_the_masked_blocks(tiny_plans, oriented, results):
    """100 steps of masked restoration (4^3 blocks, 75 %) on the plain phantoms 841/842: on the masked voxels of
    held-out cubes the fine-tuning network restores better than the best constant per cube (each cube's mean, an
    oracle) and far better than the blanked input, and the masked-voxel loss falls. Measured: 0.068 -> 0.048
    against the cube mean's 0.056 and the blanked input's 0.157. A loss on the visible voxels would leave the
    masked ones unlearned."""
    t = _trainer(tiny_plans, "mae", sources=[841, 842], epochs=10, iters_per_epoch=10, batch_size=16,
                 cubes_per_volume=[8, 8, 0], val_cubes_per_volume=[8, 8, 0], val_fraction=0.34)
    t.initialize()
    t.run_training()
    r = json.load(open(join(t.output_folder, "transfer_check.json")))
    res = t.logger.my_fantastic_logging["val_res"]
    print("masked-voxel MSE per epoch:", [round(x, 4) for x in res], r["summary"])
    assert r["voxels"] == "masked" and r["verdict"].startswith("ok")
    assert res[-1] < 0.85 * res[0]
    assert r["finetuning_network"] < r["cube_mean"] and r["finetuning_network"] < 0.5 * r["corrupted_input"], r


def test_the_readme_example_objective_is_one_file_and_one_trainer_line(tiny_plans, results, monkeypatch):
    """The README's smallest objective ('flip'), as written there, runs in the loop and its one-line trainer
    fine-tunes from its encoder (registered here as if its file were in pretraining/objectives)."""
    import re
    import sys
    import types
    from batchgenerators.utilities.file_and_folder_operations import load_json
    import nnunet_sar.pretraining.objectives as objectives
    from nnunet_sar.finetuning import DemoSchedule, nnUNetTrainerSAR
    readme = open(join(os.path.dirname(__file__), "..", "README.md")).read()
    source = re.search(r"```python\n# pretraining/objectives/flip.py\n(.*?)```", readme, re.S).group(1)
    trainer_line = re.search(r"```python\n(class nnUNetTrainerFlip\(nnUNetTrainerSAR\):.*?)```", readme, re.S).group(1)
    module = types.ModuleType("nnunet_sar.pretraining.objectives.flip")
    exec(compile(source, "flip.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    names = objectives.available()
    monkeypatch.setattr(objectives, "available", lambda: sorted(names + ["flip"]))
    t = _trainer(tiny_plans, "flip")
    t.initialize()
    t.run_training()
    ckpt = torch.load(join(t.output_folder, "checkpoint_final.pth"), weights_only=False)
    assert t.output_folder.endswith(f"nnUNetSARPretrain_flip__{tiny_plans}__3d_fullres") and ckpt["objective"] == "flip"
    assert "val_flip_acc" in ckpt["logging"] and json.load(open(join(t.output_folder, "transfer_check.json")))["kind"] == "encoder"
    scope = {"nnUNetTrainerSAR": nnUNetTrainerSAR}
    exec(trainer_line, scope)
    demo = type("nnUNetTrainerFlip_demo", (DemoSchedule, scope["nnUNetTrainerFlip"]), {})
    folder = join(os.environ["nnUNet_preprocessed"], TARGET)
    plans = {**load_json(join(folder, f"{tiny_plans}.json")), "continue_training": False}  # as get_trainer_from_args
    tr = demo(plans, "3d_fullres", 0, load_json(join(folder, "dataset.json")), torch.device("cpu"))
    tr.initialize()
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.equal(tr.network.state_dict()[key], ckpt["network_weights"][key])
    assert "the encoder only; the decoder keeps nnU-Net's initialisation" in open(tr.log_file).read()
