"""The network, exactly as nnU-Net builds it from a dataset's plans.

SAR pre-trains the very U-Net that nnU-Net will fine-tune, so the weights transfer key for key. The
pre-training network is that network with as many outputs as inputs: its seg layers serve as the
restoration output (they are the only tensors nnU-Net does not transfer).
"""
from os.path import isfile, join

import nnunetv2.paths
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_sar import SARError


def preprocessed_folder(dataset: str | int) -> str:
    """$nnUNet_preprocessed/DatasetXXX_Name for a dataset name or id."""
    root = nnunetv2.paths.nnUNet_preprocessed
    if not root:
        raise SARError("nnUNet_preprocessed is not set: export it as for nnU-Net itself")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise SARError(f"dataset {dataset!r} not found in nnUNet_raw or nnUNet_preprocessed: {e}") from None
    return join(root, name)


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


def build_pretraining_network(plans_manager, configuration_manager, num_channels: int = 1) -> torch.nn.Module:
    """The pre-training U-Net: as many outputs as inputs (restoration), one output (no deep supervision)."""
    net = build_network(plans_manager, configuration_manager, num_channels, num_channels, deep_supervision=False)
    if not (hasattr(net, "encoder") and hasattr(net, "decoder") and hasattr(net.encoder, "stages")):
        raise SARError(f"{configuration_manager.network_arch_class_name} has no encoder/decoder with stages; SAR "
                       "needs a U-Net of dynamic_network_architectures (PlainConvUNet, ResidualEncoderUNet)")
    return net


def total_strides(encoder) -> list[int]:
    """Product of the encoder's strides per axis: every patch side must be divisible by it."""
    total = [1, 1, 1]
    for s in encoder.strides:
        total = [t * int(si) for t, si in zip(total, s)]
    return total
