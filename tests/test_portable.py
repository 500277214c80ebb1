"""One pre-training, many targets (README "One pre-training, many targets"), and the portable export.

One SAR pre-training for dataset 801's tiny plans; two phantom targets take those plans over with nnU-Net's own
nnUNetv2_move_plans_between_datasets and nnUNetv2_preprocess, record the pre-training with
nnunet_sar_use_pretraining, and nnUNetTrainerSAR (found by nnU-Net's trainer lookup) fine-tunes each from the
same weights. nnunet_sar_export writes a weights_only file whose adaptation plan has every field nnssl's
AdaptationPlan and mainline nnU-Net's nnssl fine-tuning read.
"""
import json
import os
import re
from os.path import join

import pytest
import torch

from conftest import PLANNING_ENV, SOURCE_IDS, TARGET, TARGET_ID, exe, run

PLANS_A = "nnUNetPlansPortable"  # the tiny plans under a name of their own: no other test writes this run
TARGETS = {811: "Dataset811_SARPortableB", 812: "Dataset812_SARPortableC"}
LOADED = re.compile(r"SAR: loaded (\d+) pre-trained tensors \(.*?\) from (\S+)")

# the fields nnssl's AdaptationPlan.from_dict reads (src/nnssl/adaptation_planning/adaptation_plan.py) ...
ADAPTATION_PLAN_FIELDS = ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
                          "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj",
                          "key_to_lpe")
ARCHITECTURE_PLANS_FIELDS = ("arch_class_name", "arch_kwargs", "arch_kwargs_requiring_import")
PLAN_FIELDS = ("dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
               "transpose_forward", "transpose_backward", "configurations", "experiment_planner_used")
CONFIGURATION_PLAN_FIELDS = ("data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes",
                             "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs",
                             "resampling_fn_mask", "resampling_fn_mask_kwargs", "spacing", "patch_size")


def _moved_plans():
    from nnunet_sar.checkpoint import moved_plans_identifier
    return moved_plans_identifier(PLANS_A, TARGET)


def _trainer(dataset, plans):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(str(dataset), "3d_fullres", 0, "nnUNetTrainerSAR", plans, device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
    return trainer


def _encoder_state(trainer) -> dict:
    from nnunet_sar.checkpoint import encoder_keys
    return {k: v.detach().clone() for k, v in trainer.network.state_dict().items() if k in encoder_keys(trainer.network)}


@pytest.fixture(scope="module")
def one_pretraining(tiny_plans):
    """The single pre-training: dataset 801's tiny plans, 1 epoch of 2 iterations; returns its run folder."""
    from nnunet_sar.checkpoint import pretrain_output_folder
    folder = join(os.environ["nnUNet_preprocessed"], TARGET)
    plans = json.load(open(join(folder, tiny_plans + ".json")))
    plans["plans_name"] = PLANS_A
    json.dump(plans, open(join(folder, PLANS_A + ".json"), "w"))
    run([exe("nnunet_sar_pretrain"), "-d", str(TARGET_ID), "-p", PLANS_A, "--sources", *map(str, SOURCE_IDS),
         "--epochs", "1", "--iters-per-epoch", "2", "--patch-size", "16", "16", "16", "--batch-size", "4",
         "-device", "cpu"])
    return pretrain_output_folder(TARGET, "sar", PLANS_A, "3d_fullres")


@pytest.fixture(scope="module")
def moved_targets(one_pretraining, nnunet_folders):
    """Two phantom targets planned with 801's plans by nnU-Net's own commands, the pre-training recorded."""
    from nnunet_sar.phantoms import write_phantom_dataset
    moved, ids = _moved_plans(), [str(i) for i in TARGETS]
    for dataset_id, name in TARGETS.items():
        write_phantom_dataset(nnunet_folders["nnUNet_raw"], dataset_id, name.split("_", 1)[1], "MRI", num_training=5,
                              shape=(32, 32, 32), seed=dataset_id)
    # fingerprints and their own plans (nnU-Net copies dataset.json there), no preprocessing; both in one command
    run([exe("nnUNetv2_plan_and_preprocess"), "-d", *ids, "-c", "3d_fullres", "-np", "1", "-npfp", "1", "--no_pp"],
        env=PLANNING_ENV)
    for dataset_id in ids:
        run([exe("nnUNetv2_move_plans_between_datasets"), "-s", str(TARGET_ID), "-t", dataset_id,
             "-sp", PLANS_A, "-tp", moved], env=PLANNING_ENV)
    run([exe("nnUNetv2_preprocess"), "-d", *ids, "-plans_name", moved, "-c", "3d_fullres", "-np", "1"],
        env=PLANNING_ENV)
    for dataset_id in ids:
        out = run([exe("nnunet_sar_use_pretraining"), "-d", dataset_id, "-p", moved, "--from", str(TARGET_ID),
                   "-sp", PLANS_A]).stdout
        assert join(one_pretraining, "checkpoint_final.pth") in out
    return moved


@pytest.fixture(scope="module")
def exported(one_pretraining, tmp_path_factory):
    fname = str(tmp_path_factory.mktemp("export") / "sar_export.pth")
    run([exe("nnunet_sar_export"), one_pretraining, "-o", fname])
    return fname


@pytest.mark.slow  # a pre-training and two targets planned by nnU-Net's commands
def test_one_pretraining_two_targets_load_the_same_weights(one_pretraining, moved_targets):
    from nnunet_sar.checkpoint import load_checkpoint_file
    final = join(one_pretraining, "checkpoint_final.pth")
    pretrained = load_checkpoint_file(final)["network_weights"]
    counts, states = [], []
    for dataset_id, name in TARGETS.items():
        plans = json.load(open(join(os.environ["nnUNet_preprocessed"], name, moved_targets + ".json")))
        assert plans["dataset_name"] == name and plans["sar_pretrained_from"] == {
            "dataset_name": TARGET, "plans_identifier": PLANS_A, "configuration": "3d_fullres"}
        trainer = _trainer(dataset_id, moved_targets)
        trainer.initialize()
        states.append(_encoder_state(trainer))
        trainer.run_training()
        log = open(trainer.log_file).read()
        n, source = LOADED.findall(log)[-1]
        assert source == final and "learning-rate warm-up 'linear'" in log
        counts.append(int(n))
        recorded = json.load(open(join(trainer.output_folder_base, "plans.json")))  # the run keeps the provenance
        assert recorded["sar_pretrained_from"]["dataset_name"] == TARGET
    assert counts[0] == counts[1] == len(states[0]) > 20
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]) and torch.equal(value, pretrained[key]), key


@pytest.mark.slow  # a pre-training and two targets planned by nnU-Net's commands
def test_export_loads_weights_only_and_its_adaptation_plan_is_complete(one_pretraining, exported):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunet_sar.checkpoint import load_checkpoint_file
    from nnunet_sar.network import load_plans
    ckpt = load_checkpoint_file(join(one_pretraining, "checkpoint_final.pth"))
    export = torch.load(exported, weights_only=True, map_location="cpu")
    assert export["network_weights"].keys() == ckpt["network_weights"].keys()
    assert all(torch.equal(v, ckpt["network_weights"][k]) for k, v in export["network_weights"].items())
    plans_manager, configuration_manager, _ = load_plans(TARGET, PLANS_A, "3d_fullres")
    architecture = plans_manager.plans["configurations"]["3d_fullres"]["architecture"]

    plan = export["nnssl_adaptation_plan"]
    assert set(ADAPTATION_PLAN_FIELDS) <= set(plan)
    assert set(ARCHITECTURE_PLANS_FIELDS) <= set(plan["architecture_plans"])
    assert plan["architecture_plans"]["arch_class_name"] == "PlainConvUNet"
    assert plan["architecture_plans"]["arch_kwargs"] == architecture["arch_kwargs"] == plan["architecture_kwargs"]
    assert plan["architecture_plans"]["arch_kwargs_requiring_import"] == list(architecture["_kw_requires_import"])
    assert set(PLAN_FIELDS) <= set(plan["pretrain_plan"])
    assert plan["pretrain_plan"]["dataset_name"] == TARGET and plan["pretrain_plan"]["plans_name"] == PLANS_A
    assert list(plan["pretrain_plan"]["configurations"]) == ["3d_fullres"]
    configuration = plan["pretrain_plan"]["configurations"]["3d_fullres"]
    assert set(CONFIGURATION_PLAN_FIELDS) <= set(configuration)
    assert configuration["spacing"] == [1.0, 1.0, 1.0] and configuration["spacing_style"] == "onemmiso"
    assert configuration["patch_size"] == [16, 16, 16]  # the pre-training cube (mainline: pt_used_patchsize)
    assert plan["pretrain_num_input_channels"] == 1
    assert plan["recommended_downstream_patchsize"] == list(configuration_manager.patch_size)
    assert (plan["key_to_encoder"], plan["key_to_stem"], plan["key_to_lpe"]) == ("encoder.stages", "encoder.stages.0", None)
    for key in plan["keys_to_in_proj"]:
        assert export["network_weights"][key + ".weight"].shape[1] == 1
    # as mainline nnU-Net's PretrainedTrainer: the network from architecture_plans, encoder and stem loaded by prefix
    arch = plan["architecture_plans"]
    network = get_network_from_plans(arch["arch_class_name"], arch["arch_kwargs"], arch["arch_kwargs_requiring_import"],
                                     plan["pretrain_num_input_channels"], 2, allow_init=False, deep_supervision=False)
    for prefix in (plan["key_to_encoder"], plan["key_to_stem"]):
        network.get_submodule(prefix).load_state_dict(
            {k[len(prefix) + 1:]: v for k, v in export["network_weights"].items() if k.startswith(prefix + ".")})

    record = export["sar_export"]
    trained = record["trained_keys"]
    assert trained["encoder"] and trained["decoder"] and not set(trained["encoder"]) & set(trained["decoder"])
    assert all(k.startswith(("encoder.", "decoder.encoder.")) for k in trained["encoder"])
    assert record["untrained_keys"] and all(".seg_layers." in k for k in record["untrained_keys"])
    assert set(record["restoration_output"]) <= set(trained["decoder"])
    assert record["architecture"] == architecture and record["pretraining_patch_size"] == [16, 16, 16]
    assert record["intensity"]["CT"]["clip"] == [-1000.0, 1000.0] and record["intensity"]["MRI"]["clip"] == [0.0, 4000.0]
    assert export["settings"]["dataset_name"] == TARGET and export["settings"]["plans_identifier"] == PLANS_A

    again = run([exe("nnunet_sar_export"), one_pretraining, "-o", exported], check=False)
    assert again.returncode != 0 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    run([exe("nnunet_sar_export"), one_pretraining, "-o", exported, "--overwrite"])


def _nnssl_style(export: dict, channels: int = 1) -> dict:
    """A checkpoint as nnssl's AbstractBaseTrainer.save_checkpoint writes it: network_weights and the serialized
    adaptation plan, here of a pre-training with another decoder (only encoder tensors stored once)."""
    plan = {k: export["nnssl_adaptation_plan"][k] for k in ADAPTATION_PLAN_FIELDS}
    plan["pretrain_num_input_channels"] = channels
    weights = {k: v for k, v in export["network_weights"].items() if k.startswith(plan["key_to_encoder"] + ".")}
    for key in plan["keys_to_in_proj"]:
        weights[key + ".weight"] = weights[key + ".weight"].repeat(1, channels, 1, 1, 1)
    return {"network_weights": weights, "nnssl_adaptation_plan": plan, "trainer_name": "BaseMAETrainer",
            "current_epoch": 1, "init_args": {"configuration": "onemmiso"}}


@pytest.mark.slow  # a pre-training and two targets planned by nnU-Net's commands
def test_finetuning_imports_our_export_and_an_nnssl_file(moved_targets, exported, tmp_path, monkeypatch):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import CHECKPOINT_ENV, transferable_weights
    export = torch.load(exported, weights_only=True)
    nnssl = str(tmp_path / "nnssl_checkpoint.pth")
    torch.save(_nnssl_style(export), nnssl)
    torch.load(nnssl, weights_only=True)
    dataset_id = next(iter(TARGETS))
    loaded = {}
    for fname in (exported, nnssl):  # $nnUNet_SAR_checkpoint wins over the plans' record
        monkeypatch.setenv(CHECKPOINT_ENV, fname)
        trainer = _trainer(dataset_id, moved_targets)
        trainer.initialize()
        n, source = LOADED.findall(open(trainer.log_file).read())[-1]
        assert source == fname
        loaded[fname] = (int(n), _encoder_state(trainer))
    (n_ours, ours), (n_nnssl, theirs) = loaded.values()
    assert n_ours == n_nnssl == len(ours)
    assert all(torch.equal(v, theirs[k]) and torch.equal(v, export["network_weights"][k]) for k, v in ours.items())
    # nnssl's decoder is not ours: full transfer refuses in one line that names the fix
    with pytest.raises(SARError, match="nnUNetv2_preprocess_like_nnssl") as e:
        transferable_weights(trainer.network, nnssl, parts="all")
    assert "\n" not in str(e.value)
    # nnU-Net's stock -pretrained_weights route takes the export (all tensors but the seg layers)
    load_pretrained_weights(trainer.network, exported)
    state = trainer.network.state_dict()
    assert all(torch.equal(state[k], v) for k, v in export["network_weights"].items() if ".seg_layers." not in k)


@pytest.mark.slow  # a pre-training and two targets planned by nnU-Net's commands
def test_mismatches_fail_in_one_line_that_names_the_fix(moved_targets, exported, tmp_path):
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import load_pretrained_into
    from nnunet_sar.network import build_target_network, load_plans
    two_channels = str(tmp_path / "two_channels.pth")
    torch.save(_nnssl_style(torch.load(exported, weights_only=True), channels=2), two_channels)
    network = build_target_network(*load_plans(TARGETS[811], moved_targets))
    with pytest.raises(SARError, match="pre-trained on 2 input channels.*this target has 1") as e:
        load_pretrained_into(network, two_channels, parts="encoder")
    assert "\n" not in str(e.value)
    # topology: 801's own (larger) plans cannot take the tiny pre-training; nothing is recorded
    plans_file = join(os.environ["nnUNet_preprocessed"], TARGET, "nnUNetPlans.json")
    before = open(plans_file).read()
    done = run([exe("nnunet_sar_use_pretraining"), "-d", str(TARGET_ID), "-p", "nnUNetPlans", "--from", str(TARGET_ID),
                "-sp", PLANS_A], check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "does not fit" in done.stderr and "nnUNetv2_move_plans_between_datasets -s " + TARGET in done.stderr
    assert open(plans_file).read() == before
    # plans that record a pre-training keep it: another needs --overwrite (the same one again is fine)
    moved_file = join(os.environ["nnUNet_preprocessed"], TARGETS[811], moved_targets + ".json")
    before = open(moved_file).read()
    use = [exe("nnunet_sar_use_pretraining"), "-d", "811", "-p", moved_targets, "--from"]
    done = run([*use, exported], check=False)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1 and "--overwrite" in done.stderr
    assert TARGET in done.stderr and open(moved_file).read() == before
    run([*use, str(TARGET_ID), "-sp", PLANS_A])
    assert open(moved_file).read() == before
    run([*use, exported, "--overwrite"])
    assert json.load(open(moved_file))["sar_pretrained_from"] == {"checkpoint": exported}
    run([*use, str(TARGET_ID), "-sp", PLANS_A, "--overwrite"])  # as the other tests expect it
    assert open(moved_file).read() == before


def test_nnssl_encoder_under_another_key_is_renamed(tiny_plans, tmp_path):
    """nnssl names where its encoder lives (key_to_encoder); a checkpoint that keeps it elsewhere still loads."""
    from nnunet_sar.checkpoint import encoder_keys, load_pretrained_into
    from nnunet_sar.network import build_target_network, load_plans
    source, target = (build_target_network(*load_plans(TARGET, tiny_plans)) for _ in range(2))
    weights = {"model." + k: v for k, v in source.state_dict().items() if k.startswith("encoder.stages.")}
    fname = str(tmp_path / "nnssl_renamed.pth")
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": {
        "key_to_encoder": "model.encoder.stages", "key_to_stem": "model.encoder.stages.0"}}, fname)
    assert load_pretrained_into(target, fname, parts="encoder") == len(encoder_keys(target))
    assert all(torch.equal(target.state_dict()[k], source.state_dict()[k]) for k in encoder_keys(target))
