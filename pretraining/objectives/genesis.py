"""Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021): restore the clean cube from its corrupted copy,
on the same multi-scale cubes; SAR's ``genesis`` variant (restoration only), also as its own objective."""
from nnunet_sar.pretraining.objectives.sar import SAR


class Genesis(SAR):
    name = "genesis"
    trainer = "nnUNetTrainerGenesis"  # its fine-tuning trainer (trainers/)
    description = "Models Genesis: restoration of corrupted cubes only (= --objective sar --variant genesis)"
    fixed_variant = "genesis"


OBJECTIVE = Genesis
