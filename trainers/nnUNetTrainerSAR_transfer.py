"""How fine-tuning starts from the pre-trained weights (the transfer issue). The default
``nnUNetTrainerSAR`` transfers the encoder (the decoder keeps nnU-Net's initialisation) and warms the
learning rate up linearly; each of these changes one thing. Measured in BENCHMARKS.md (transfer
benchmark). Logic: ``nnunet_sar.finetuning`` (``SARInitialisation``, ``LearningRateWarmup``)."""
from nnunet_sar.finetuning import nnUNetTrainerSAR


class nnUNetTrainerSAR_noWarmup(nnUNetTrainerSAR):
    """nnU-Net's poly schedule from the first step."""
    warmup = None


class nnUNetTrainerSAR_fullTransfer(nnUNetTrainerSAR):
    """Encoder and decoder transferred (as the paper and Models Genesis do), linear warm-up."""
    transfer_parts = "all"


class nnUNetTrainerSAR_sawtooth(nnUNetTrainerSAR):
    """Encoder and decoder transferred; the decoder warms up alone (encoder at lr 0), then all layers warm
    up again (Wald et al., CVPR 2025)."""
    transfer_parts = "all"
    warmup = "sawtooth"


class nnUNetTrainerSAR_fullTransfer_noWarmup(nnUNetTrainerSAR):
    """Encoder and decoder transferred, no warm-up: how nnUNetTrainerSAR started before the transfer issue."""
    transfer_parts = "all"
    warmup = None
