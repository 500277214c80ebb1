"""Fine-tuning from the pre-training variants of the paper's ablations (Tables 2 and 3): nnU-Net's
default recipe, each starting from the checkpoint of ``nnunet_sar_pretrain --variant <name>``."""
from nnunet_sar.finetuning import nnUNetTrainerSAR


class nnUNetTrainerGenesis(nnUNetTrainerSAR):
    pretraining_variant = "genesis"


class nnUNetTrainerSAR_SAonly(nnUNetTrainerSAR):
    pretraining_variant = "sa"


class nnUNetTrainerSAR_MIALonly(nnUNetTrainerSAR):
    pretraining_variant = "mial"


class nnUNetTrainerSAR_scale2(nnUNetTrainerSAR):
    pretraining_variant = "scale2"


class nnUNetTrainerSAR_scale4(nnUNetTrainerSAR):
    pretraining_variant = "scale4"


class nnUNetTrainerSAR_scale8(nnUNetTrainerSAR):
    pretraining_variant = "scale8"
