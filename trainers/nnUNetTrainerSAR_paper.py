"""The paper's experiments as trainers: its fine-tuning recipe (3.3: Adam 1e-3, Dice loss,
ReduceLROnPlateau) from SAR weights and from scratch, and nnU-Net's recipe on 1/K of each fold's
training cases (4.0.3, Table 4), with subsets identical for SAR and scratch. Logic: ``nnunet_sar.finetuning``."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sar.finetuning import PaperFineTuning, TrainingFraction, nnUNetTrainerSAR


class nnUNetTrainerSAR_paperFT(PaperFineTuning, nnUNetTrainerSAR):
    pass


class nnUNetTrainer_paperFT(PaperFineTuning, nnUNetTrainer):
    pass


class nnUNetTrainerSAR_frac2(TrainingFraction, nnUNetTrainerSAR):
    fraction_denominator = 2


class nnUNetTrainerSAR_frac5(TrainingFraction, nnUNetTrainerSAR):
    fraction_denominator = 5


class nnUNetTrainerSAR_frac10(TrainingFraction, nnUNetTrainerSAR):
    fraction_denominator = 10


class nnUNetTrainerSAR_frac20(TrainingFraction, nnUNetTrainerSAR):
    fraction_denominator = 20


class nnUNetTrainerSAR_frac50(TrainingFraction, nnUNetTrainerSAR):
    fraction_denominator = 50


class nnUNetTrainer_frac2(TrainingFraction, nnUNetTrainer):
    fraction_denominator = 2


class nnUNetTrainer_frac5(TrainingFraction, nnUNetTrainer):
    fraction_denominator = 5


class nnUNetTrainer_frac10(TrainingFraction, nnUNetTrainer):
    fraction_denominator = 10


class nnUNetTrainer_frac20(TrainingFraction, nnUNetTrainer):
    fraction_denominator = 20


class nnUNetTrainer_frac50(TrainingFraction, nnUNetTrainer):
    fraction_denominator = 50
