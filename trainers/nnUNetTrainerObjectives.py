"""Fine-tuning from the other pre-training objectives (``nnunet_sar_pretrain --objective NAME``; Table 2's
3D proxy tasks of Taleb et al. 2020 and masked restoration): nnU-Net's recipe with a warm-up, each from its
own objective's checkpoint. The proxy tasks train the encoder alone: their trainers load the encoder and
leave the decoder at nnU-Net's initialisation (and say so in the log). MAE trains encoder and decoder and
hands on both, with Wald et al.'s (CVPR 2025) sawtooth warm-up (decoder first, then all)."""
from nnunet_sar.finetuning import nnUNetTrainerSAR


class nnUNetTrainerMAE(nnUNetTrainerSAR):
    pretraining_variant, transfer_parts, warmup = "mae", "all", "sawtooth"


class nnUNetTrainerRot(nnUNetTrainerSAR):
    pretraining_variant = "rot"


class nnUNetTrainerRPL(nnUNetTrainerSAR):
    pretraining_variant = "rpl"


class nnUNetTrainerJigsaw(nnUNetTrainerSAR):
    pretraining_variant = "jigsaw"


class nnUNetTrainerCPC(nnUNetTrainerSAR):
    pretraining_variant = "cpc"
