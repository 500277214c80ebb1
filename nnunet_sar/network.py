"""The network, exactly as nnU-Net builds it from a dataset's plans.

SAR pre-trains the very U-Net that nnU-Net will fine-tune, so the weights transfer key for key. The
pre-training network is that network with as many outputs as inputs: its seg layers serve as the
restoration output (they are the only tensors nnU-Net does not transfer).
"""
from copy import deepcopy
from os.path import isfile, join

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_sar import SARError, nnunet_folder, one_line


def dataset_name(dataset: str | int) -> str:
    """DatasetXXX_Name for a dataset name or id, as nnU-Net resolves it; a one-line SARError otherwise."""
    try:
        return maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise SARError(f"dataset {dataset!r} not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results: "
                       f"{one_line(e)}") from None


def preprocessed_folder(dataset: str | int) -> str:
    """$nnUNet_preprocessed/DatasetXXX_Name for a dataset name or id."""
    return join(nnunet_folder("nnUNet_preprocessed"), dataset_name(dataset))


def load_plans(dataset: str | int, plans_identifier: str = "nnUNetPlans", configuration: str = "3d_fullres"):
    """(PlansManager, ConfigurationManager, dataset_json) of a planned dataset, or a SARError that says
    which nnU-Net command creates the missing plans."""
    folder = preprocessed_folder(dataset)
    plans_file = join(folder, plans_identifier + ".json")
    if not isfile(plans_file):
        planner = " -pl nnUNetPlannerResEncM" if "ResEnc" in plans_identifier else ""
        raise SARError(f"no plans {plans_file}. Run first: nnUNetv2_plan_and_preprocess -d {dataset} "
                       f"-c {configuration}{planner}")
    plans_manager = PlansManager(plans_file)
    if configuration not in plans_manager.available_configurations:
        raise SARError(f"configuration {configuration!r} is not in {plans_file} "
                       f"(available: {', '.join(plans_manager.available_configurations)})")
    return plans_manager, plans_manager.get_configuration(configuration), load_json(join(folder, "dataset.json"))


def build_network(plans_manager: PlansManager, configuration_manager: ConfigurationManager, num_input_channels: int,
                  num_output_channels: int, deep_supervision: bool = True, trainer_class=None) -> torch.nn.Module:
    """The network nnU-Net's trainer builds (its own static builder, so plans presets and custom
    architectures behave exactly as in nnU-Net)."""
    if trainer_class is None:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_class
    return trainer_class.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                    num_output_channels, deep_supervision)


def build_target_network(plans_manager, configuration_manager, dataset_json, deep_supervision=True):
    """The fine-tuning network: the dataset's input channels and segmentation heads."""
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return build_network(plans_manager, configuration_manager, n_in, n_out, deep_supervision)


PRETRAINING_NORMS = {"batch": "torch.nn.BatchNorm3d", "instance": None}  # None: the plans' own norm
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def build_pretraining_network(plans_manager, configuration_manager, num_channels: int = 1,
                              norm: str = "instance") -> torch.nn.Module:
    """The pre-training U-Net: as many outputs as inputs (restoration), one output (no deep supervision).

    ``norm='instance'`` keeps the plans' own norm: the network nnU-Net fine-tunes then computes exactly
    the function pre-trained here (the heads read features before the norm, see ``pretraining.model``).
    ``norm='batch'`` swaps it for BatchNorm, as the paper's pre-training U-Net (3.3): same keys and shapes
    (apart from batch norm's running statistics, see ``nnunet_weights``), but another function once nnU-Net
    runs it with instance norm, which the transfer check measures.
    """
    if norm not in PRETRAINING_NORMS:
        raise SARError(f"unknown norm {norm!r}; choose from {', '.join(PRETRAINING_NORMS)}")
    if PRETRAINING_NORMS[norm] is not None:
        configuration_manager = ConfigurationManager(deepcopy(configuration_manager.configuration))
        configuration_manager.configuration["architecture"]["arch_kwargs"]["norm_op"] = PRETRAINING_NORMS[norm]
    net = build_network(plans_manager, configuration_manager, num_channels, num_channels, deep_supervision=False)
    for layer in getattr(getattr(net, "decoder", None), "seg_layers", [])[:-1]:
        layer.requires_grad_(False)  # deep-supervision outputs: unused in restoration (and never transferred)
    if not (hasattr(net, "encoder") and hasattr(net, "decoder") and hasattr(net.encoder, "stages")):
        raise SARError(f"{configuration_manager.network_arch_class_name} has no encoder/decoder with stages; SAR "
                       "needs a U-Net of dynamic_network_architectures (PlainConvUNet, ResidualEncoderUNet)")
    return net


def nnunet_weights(state_dict: dict) -> dict:
    """The tensors nnU-Net's network has: a state dict without batch norm's running statistics."""
    return {k: v for k, v in state_dict.items() if not k.endswith(BATCHNORM_STATISTICS)}
