"""Short CPU schedules for nnunet_sar_demo and the tests: SAR and its from-scratch baseline."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sar.finetuning import DemoSchedule, nnUNetTrainerSAR


class nnUNetTrainerSAR_demo(DemoSchedule, nnUNetTrainerSAR):
    pass


class nnUNetTrainer_demo(DemoSchedule, nnUNetTrainer):
    pass
