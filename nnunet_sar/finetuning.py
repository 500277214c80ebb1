"""The fine-tuning side: nnU-Net's trainer, started from a SAR checkpoint.

``SARInitialisation`` is a mixin for any nnUNetTrainer: after nnU-Net's own ``initialize()`` has built
the network from the plans, it loads the pre-training checkpoint of the same dataset, plans and
configuration (variant ``pretraining_variant``), verifying every tensor and logging how many it
loaded and from where. Nothing is frozen. The named trainers live in ``trainers/`` (installed into
nnU-Net's trainer folder) and are one or two lines each.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sar.checkpoint import find_pretrained_checkpoint, load_pretrained_into


class SARInitialisation:
    pretraining_variant = "sar"

    def initialize(self):
        was_initialized = self.was_initialized
        super().initialize()
        if was_initialized:
            return
        fname = find_pretrained_checkpoint(self.plans_manager.dataset_name, self.pretraining_variant,
                                           self.plans_manager.plans_name, self.configuration_name)
        n = load_pretrained_into(self.network, fname)
        self.print_to_log_file(f"SAR: loaded {n} pre-trained tensors (all but the seg layers) from {fname}")


class DemoSchedule:
    """A few short epochs, for nnunet_sar_demo and the tests on a CPU. (nnU-Net records the arguments
    of ``__init__`` by signature, so it must be spelled out.)"""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 3


class nnUNetTrainerSAR(SARInitialisation, nnUNetTrainer):
    """nnU-Net's default recipe, initialised from SAR pre-training."""
