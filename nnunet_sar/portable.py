"""Checkpoints that travel: one pre-training, many targets, and files that mainline nnU-Net and nnssl read.

Pre-training is the expensive step, so one run serves many targets, by nnU-Net's documented route for
pre-trained weights: the target takes over the pre-training's plans (``nnUNetv2_move_plans_between_datasets``,
``nnUNetv2_preprocess``), so that its network is the pre-trained one key for key.

- ``nnunet_sar_use_pretraining -d TARGET -p MOVED_PLANS --from DATASET`` records in the moved plans which
  pre-training they fine-tune from (``sar_pretrained_from``, read by ``find_pretrained_checkpoint``), after
  checking that the checkpoint fits the target's network (channels, topology).
- ``nnunet_sar_export RUN -o FILE`` writes one file that ``torch.load(FILE, weights_only=True)`` reads: the
  weights (nnU-Net's keys, so also a ``-pretrained_weights`` file), the plans' architecture, the pre-training's
  settings, spacing, intensities and patch, which keys it trained, and an adaptation plan under
  ``nnssl_adaptation_plan`` with the fields of nnssl's ``AdaptationPlan.serialize`` that mainline nnU-Net's
  nnssl fine-tuning reads (``nnunetv2/experiment_planning/like_nnssl.py``,
  ``nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py``).
"""
import argparse
import inspect
import json
import os
from os.path import abspath, isdir, isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_sar import SARError, __version__, console_main, one_line
from nnunet_sar.checkpoint import (CHECKPOINT_ENV, NNSSL_PLAN, PRETRAINED_FROM, atomic_save, encoder_keys,
                                   load_checkpoint_file, pointed_checkpoint, transferable_weights)
from nnunet_sar.files import atomic_write_json
from nnunet_sar.network import build_network, build_target_network, dataset_name, load_plans, preprocessed_folder

CITATION = ("Zhang X, Feng S, Zhou Y, Zhang Y, Wang Y. SAR: Scale-Aware Restoration Learning for 3D Tumor "
            "Segmentation. MICCAI 2021.")


# ------------------------------------------------------------------ one pre-training, many targets
def use_pretraining(target: str, plans_identifier: str, source: str, source_plans: str = "nnUNetPlans",
                    configuration: str = "3d_fullres", variant: str = "sar", overwrite: bool = False) -> tuple[str, int]:
    """Records in the target's (moved) plans which pre-training ``nnUNetTrainerSAR -p plans_identifier`` loads:
    a dataset's run ({'dataset_name', 'plans_identifier', 'configuration'}: each trainer then finds its own
    variant's run) or a checkpoint file. Checks first that the checkpoint (of `variant`) fits the network of
    these plans; returns (checkpoint, number of encoder tensors it gives). Plans that already record another
    pre-training keep it unless ``overwrite`` (the folds trained from them came from that one)."""
    name = dataset_name(target)
    pointer = {"checkpoint": abspath(source)} if isfile(source) else \
        {"dataset_name": dataset_name(source), "plans_identifier": source_plans, "configuration": configuration}
    plans_file = join(preprocessed_folder(name), plans_identifier + ".json")
    fname = pointed_checkpoint(pointer, variant, plans_file)
    network = build_target_network(*load_plans(name, plans_identifier, configuration))
    plans = load_json(plans_file)
    recorded = plans.get(PRETRAINED_FROM)
    if recorded and recorded != pointer and not overwrite:
        raise SARError(f"{plans_file} already fine-tunes from {recorded}; give --overwrite to record {pointer} instead "
                       f"(folds trained with these plans started from the recorded one)")
    n = len(transferable_weights(network, fname, log=lambda *a: None, parts="encoder"))
    plans[PRETRAINED_FROM] = pointer
    # the plans nnU-Net trains from: a failed write must leave them whole
    atomic_write_json(plans_file, plans, what="the plans ")
    return fname, n


def main_use_pretraining(argv=None):
    p = argparse.ArgumentParser(
        prog="nnunet_sar_use_pretraining",
        description="Record in a target's plans (moved from the pre-training's dataset with "
                    "nnUNetv2_move_plans_between_datasets, then nnUNetv2_preprocess) which SAR pre-training "
                    "nnUNetTrainerSAR fine-tunes from. $nnUNet_SAR_checkpoint, when set, still wins.")
    p.add_argument("-d", dest="target", required=True, help="target dataset name or id")
    p.add_argument("-p", dest="plans_identifier", required=True, help="the target's moved plans identifier")
    p.add_argument("--from", dest="source", required=True,
                   help="the dataset the pre-training ran for (name or id), or a checkpoint file "
                        "(e.g. one written by nnunet_sar_export, or nnssl's)")
    p.add_argument("-sp", dest="source_plans", default="nnUNetPlans",
                   help="plans identifier of the pre-training run [%(default)s]")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="[%(default)s]")
    p.add_argument("--variant", default="sar", help="the run checked now; each trainer loads its own variant [sar]")
    p.add_argument("--overwrite", action="store_true", help="replace another pre-training the plans already record")
    args = p.parse_args(argv)
    fname, n = console_main("nnunet_sar_use_pretraining")(use_pretraining)(
        args.target, args.plans_identifier, args.source, args.source_plans, args.configuration, args.variant,
        args.overwrite)
    print(f"{args.plans_identifier} of {dataset_name(args.target)} fine-tunes from {fname} ({n} encoder tensors fit); "
          f"train with: nnUNetv2_train {args.target} {args.configuration} FOLD -tr nnUNetTrainerSAR "
          f"-p {args.plans_identifier}")


# ------------------------------------------------------------------ the portable export
def _source_defaults() -> dict:
    """Spacing and intensity windows the pre-training sources are preprocessed with (sources.py's defaults,
    which the pre-training loop uses)."""
    from nnunet_sar.pretraining.sources import preprocess_sources
    params = inspect.signature(preprocess_sources).parameters
    return {k: [float(v) for v in params[k].default] for k in ("spacing", "ct_clip", "mri_clip")}


def plain(obj, what: str):
    """`obj` as JSON types only (dicts, lists, str, int, float, bool, None), which weights_only=True reads."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise SARError(f"{what} holds a value that a weights_only file cannot: {one_line(e)}") from None


def adaptation_plan(plans: dict, configuration: str, settings: dict, network: torch.nn.Module) -> dict:
    """nnssl's adaptation plan (``AdaptationPlan.serialize``: architecture_plans, pretrain_plan,
    pretrain_num_input_channels, recommended_downstream_patchsize, key_to_encoder, key_to_stem, keys_to_in_proj,
    key_to_lpe) for a SAR pre-training, plus ``architecture_kwargs``, which mainline nnU-Net's dynamic
    adaptation reads for the kernel sizes and stages (it assumes 3x3x3 kernels without it). The architecture is
    the plans' (nnU-Net's arch_kwargs, not nnssl's ResEnc-only dataclass); the pre-training plan describes
    the sources: 1 mm, each modality clipped to its window and scaled to [0, 1], cubes of the pre-training
    patch; the recommended fine-tuning patch is the plans' own."""
    arch = plans["configurations"][configuration]["architecture"]
    sources = _source_defaults()
    return {
        "architecture_plans": {"arch_class_name": arch["network_class_name"].split(".")[-1],
                               "arch_kwargs": arch["arch_kwargs"],
                               "arch_kwargs_requiring_import": list(arch["_kw_requires_import"])},
        "pretrain_plan": {
            "dataset_name": plans["dataset_name"], "plans_name": plans["plans_name"],
            "original_median_spacing_after_transp": plans["original_median_spacing_after_transp"],
            "image_reader_writer": plans["image_reader_writer"],
            "transpose_forward": plans["transpose_forward"], "transpose_backward": plans["transpose_backward"],
            "experiment_planner_used": plans["experiment_planner_used"],
            "configurations": {configuration: {
                "data_identifier": "nnUNetSAR_sources", "preprocessor_name": "nnunet_sar.pretraining.sources",
                "spacing_style": "onemmiso" if sources["spacing"] == [1.0, 1.0, 1.0] else "fixed",
                "normalization_schemes": ["SARModalityWindowTo01"], "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 3, "force_separate_z": False},
                "resampling_fn_mask": "resample_data_or_seg_to_shape",
                "resampling_fn_mask_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": False},
                "spacing": sources["spacing"], "patch_size": list(settings["patch_size"])}}},
        "pretrain_num_input_channels": int(settings.get("num_input_channels", 1)),
        "recommended_downstream_patchsize": list(plans["configurations"][configuration]["patch_size"]),
        "key_to_encoder": network.key_to_encoder, "key_to_stem": network.key_to_stem,
        "keys_to_in_proj": list(network.keys_to_in_proj), "key_to_lpe": getattr(network, "key_to_lpe", None),
        "architecture_kwargs": arch["arch_kwargs"],
    }


def export_checkpoint(run: str, out: str, overwrite: bool = False) -> dict:
    """Writes the portable file of a pre-training run (its folder: checkpoint_final.pth, or a checkpoint file)
    atomically to `out`; refuses to replace an existing file unless `overwrite`. Returns what it wrote."""
    fname = join(run, "checkpoint_final.pth") if isdir(run) else run
    if not isfile(fname):
        raise SARError(f"no checkpoint {fname}: give a pre-training run folder or its checkpoint file")
    if os.path.exists(out) and not overwrite:
        raise SARError(f"{out} exists; pass --overwrite to replace it")
    ckpt = load_checkpoint_file(fname)
    settings = ckpt.get("settings")
    if not settings or "dataset_name" not in settings:
        raise SARError(f"{fname} is not a SAR pre-training checkpoint (no 'settings'); export the run's checkpoint")
    plans_manager, configuration_manager, _ = load_plans(settings["dataset_name"], settings["plans_identifier"],
                                                         settings["configuration"])
    network = build_network(plans_manager, configuration_manager, 1, 1)
    weights = {k: v.detach().cpu().contiguous() for k, v in ckpt["network_weights"].items()}
    try:
        network.load_state_dict(weights)
    except RuntimeError as e:
        raise SARError(f"{fname} no longer fits {settings['plans_identifier']} of {settings['dataset_name']} (were the "
                       f"plans changed after pre-training?): {one_line(e)[:300]}") from None
    encoder = encoder_keys(network)
    last_output = f"decoder.seg_layers.{len(network.decoder.seg_layers) - 1}."
    frozen = [k for k in weights if ".seg_layers." in k and not k.startswith(last_output)]  # deep supervision
    trained = set(ckpt.get("trained_keys") or weights)  # what the objective trained (older checkpoints: all)
    plans = plans_manager.plans
    sources = _source_defaults()
    export = {
        "network_weights": weights,
        NNSSL_PLAN: plain(adaptation_plan(plans, settings["configuration"], settings, network), "the adaptation plan"),
        "settings": plain(settings, f"the settings of {fname}"),
        "sar_export": plain({
            "nnunet_sar_version": __version__, "source_checkpoint": abspath(fname),
            "epochs_trained": ckpt.get("current_epoch"), "trainer_name": ckpt.get("trainer_name"),
            "dataset_name": settings["dataset_name"], "plans_identifier": settings["plans_identifier"],
            "configuration": settings["configuration"],
            "architecture": plans["configurations"][settings["configuration"]]["architecture"],
            "plans_spacing": configuration_manager.spacing, "pretraining_spacing": sources["spacing"],
            "intensity": {"CT": {"clip": sources["ct_clip"], "then": "min-max to [0, 1] per volume"},
                          "MRI": {"clip": sources["mri_clip"], "then": "min-max to [0, 1] per volume"}},
            "pretraining_patch_size": settings["patch_size"], "plans_patch_size": configuration_manager.patch_size,
            "trained_keys": {"encoder": sorted(k for k in weights if k in encoder and k in trained),
                             "decoder": sorted(k for k in weights if k not in encoder and k not in frozen and k in trained)},
            "untrained_keys": sorted(k for k in weights if k in frozen or k not in trained),
            "objective": ckpt.get("objective", "sar"),
            "restoration_output": sorted(k for k in weights if k.startswith(last_output)),
            "nnUNetTrainerSAR_transfers": "encoder",
        }, "the export record"),
        "trainer_name": str(ckpt.get("trainer_name")),
        "citations": [CITATION],
    }
    atomic_save(export, out)
    return export


def main_export(argv=None):
    p = argparse.ArgumentParser(
        prog="nnunet_sar_export",
        description="Write a SAR pre-training as one portable file that torch.load(FILE, weights_only=True) reads: "
                    "weights, architecture, pre-training settings and an nnssl adaptation plan. Fine-tune from it "
                    f"with {CHECKPOINT_ENV}=FILE nnUNetv2_train ... -tr nnUNetTrainerSAR, or -pretrained_weights FILE.")
    p.add_argument("run", metavar="RUN_FOLDER_OR_CHECKPOINT",
                   help="a pre-training output folder (its checkpoint_final.pth is exported) or a checkpoint file")
    p.add_argument("-o", dest="out", required=True, help="the file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    export = console_main("nnunet_sar_export")(export_checkpoint)(args.run, args.out, args.overwrite)
    record = export["sar_export"]
    print(f"wrote {args.out}: {len(export['network_weights'])} tensors of {record['dataset_name']} / "
          f"{record['plans_identifier']} / {record['configuration']} ({len(record['trained_keys']['encoder'])} encoder, "
          f"{len(record['trained_keys']['decoder'])} decoder keys trained)")
