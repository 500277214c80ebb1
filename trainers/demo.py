"""Short CPU schedules (3 epochs of 10 iterations) for nnunet_sar_demo, the tests and the transfer
benchmark: SAR with each transfer choice, Genesis and the from-scratch baseline. (Each repeats the
attributes of its full-length trainer: nnU-Net imports a trainer module by file, not as a package.)"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sar.finetuning import DemoSchedule, nnUNetTrainerSAR


class nnUNetTrainerSAR_demo(DemoSchedule, nnUNetTrainerSAR):
    pass


class nnUNetTrainerSAR_noWarmup_demo(DemoSchedule, nnUNetTrainerSAR):
    warmup = None


class nnUNetTrainerSAR_fullTransfer_demo(DemoSchedule, nnUNetTrainerSAR):
    transfer_parts = "all"


class nnUNetTrainerSAR_sawtooth_demo(DemoSchedule, nnUNetTrainerSAR):
    transfer_parts, warmup = "all", "sawtooth"


class nnUNetTrainerSAR_fullTransfer_noWarmup_demo(DemoSchedule, nnUNetTrainerSAR):
    transfer_parts, warmup = "all", None


class nnUNetTrainerGenesis_demo(DemoSchedule, nnUNetTrainerSAR):
    pretraining_variant = "genesis"


class nnUNetTrainer_demo(DemoSchedule, nnUNetTrainer):
    pass


class nnUNetTrainerSAR_check(DemoSchedule, nnUNetTrainerSAR):
    """``nnunet_sar_demo --tiny`` (the CPU form of ``nnunet_sar_benchmark --gpu-check``): 1 epoch of 2 iterations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1


class nnUNetTrainerMAE_demo(DemoSchedule, nnUNetTrainerSAR):
    pretraining_variant, transfer_parts, warmup = "mae", "all", "sawtooth"


class nnUNetTrainerRot_demo(DemoSchedule, nnUNetTrainerSAR):
    pretraining_variant = "rot"


class nnUNetTrainerRPL_demo(DemoSchedule, nnUNetTrainerSAR):
    pretraining_variant = "rpl"


class nnUNetTrainerJigsaw_demo(DemoSchedule, nnUNetTrainerSAR):
    pretraining_variant = "jigsaw"


class nnUNetTrainerCPC_demo(DemoSchedule, nnUNetTrainerSAR):
    pretraining_variant = "cpc"
