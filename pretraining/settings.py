"""What defines a pre-training run: ``PretrainSettings`` (saved in every checkpoint and in settings.json), the
paper's preset (3.1-3.3, Table 1) and the optimizers. Apart from the loop, so that what reads a run's record
(the transfer check, the command line) does not import the loop that writes it."""
from dataclasses import dataclass, field

from nnunet_sar.pretraining.corruptions import GENESIS_PROBABILITIES
from nnunet_sar.pretraining.cubes import DEFAULT_CUBES_PER_VOLUME


@dataclass
class PretrainSettings:
    """Everything that defines a run; saved in every checkpoint and in settings.json."""
    dataset: str
    sources: list
    plans_identifier: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    objective: str = "sar"              # a module of pretraining/objectives (found by name)
    variant: str | None = None          # SAR's ablations (objective sar); None: the objective's own run
    objective_options: dict = field(default_factory=dict)  # the objective's own settings (its Settings)
    transform_on: str = "loader"        # where the objective's cube transforms run: "loader" or "device"
    epochs: int = 100
    iters_per_epoch: int | None = None  # None: Table 1's cubes per volume make an epoch
    batch_size: int | None = None       # None: the plans' batch size
    patch_size: list | None = None      # None: the plans' patch size
    cubes_per_volume: list = field(default_factory=lambda: list(DEFAULT_CUBES_PER_VOLUME))
    cubes_per_source: dict = field(default_factory=dict)  # see source_cubes_per_volume
    val_cubes_per_volume: list = field(default_factory=lambda: [2, 2, 4])
    val_fraction: float = 0.1
    corruptions: dict = field(default_factory=lambda: dict(GENESIS_PROBABILITIES))  # Models Genesis' rates
    alpha: float = 1.0
    beta: float = 10.0
    adv_weight: float = 1.0             # gradient-reversal weight; 0 keeps M as a probe only
    # not the paper's 1.0 (kept by --preset paper): measured on phantoms, 30 steps at 0.1 moved the encoder
    # further than nnU-Net's 30 demo iterations could use; 0.01 removed that stall (BENCHMARKS.md, transfer)
    lr_unet: float = 0.01
    lr_scale: float = 0.1
    lr_disc: float = 1e-3
    momentum: float = 0.9
    optimizer: str = "sgd"              # "adam": Adam at ADAM_LRS unless learning rates are given (OPTIMIZERS)
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    num_workers: int = 0
    cache_dir: str | None = None
    norm: str = "instance"              # the plans' own norm, so nnU-Net fine-tunes the function pre-trained here
    restoration_target: str = "standardised"  # the clean cube standardised by its own mean and std (objectives.base)
    intensity: str = "unit"             # "nnunet": cubes normalised as nnU-Net normalises the target (intensity.py)
    seed: int = 12345
    device: str = "cuda"
    preset: str | None = None           # "paper": the command line's --preset (PAPER_PRESET)
    preset_values: dict = field(default_factory=dict)  # what the preset set (options given explicitly win)


# Table 1, sub-volumes per source / cases, as (large, medium, small) per volume and epoch: LUNA16
# 19936 : 9968 : 9968 small : medium : large over 623 cases and BraTS 24320 : 12160 : 12160 over 190 x 4
# volumes are 32 : 16 : 16; LiTS (111) and MSD Heart (30) get twice that.
PAPER_CUBES_PER_SOURCE = {"LUNA": [16, 16, 32], "LiTS": [32, 32, 64], "BraTS": [16, 16, 32], "Heart": [32, 32, 64]}

# ``nnunet_sar_pretrain --preset paper``: the paper's configuration (3.1-3.3); flags given with it win.
PAPER_PRESET = {
    "patch_size": [32, 64, 64],  # the paper's 64 x 64 x 32 cube is (x, y, z); nnU-Net's arrays are (z, y, x)
    # The paper gives no batch size. 32 cubes of 32 x 64 x 64 are the voxels of nnU-Net's own 2 x 128^3
    # batch (the same GPU memory), and S and M see about 8 large, 8 medium, 16 small cubes and both
    # modalities in every batch (M normalises its features over the batch; at 2 it is nearly blind).
    "batch_size": 32,
    "cubes_per_source": PAPER_CUBES_PER_SOURCE,  # Table 1; other sources get --cubes-per-volume
    "alpha": 1.0, "beta": 10.0, "adv_weight": 1.0,  # Eq. 4, a plain min-max game
    "lr_unet": 1.0, "lr_scale": 0.1, "lr_disc": 1e-3,  # 3.3, SGD, ReduceLROnPlateau on the validation loss
    # silent in the paper: Models Genesis' momentum, halving after 10 epochs without improvement
    "momentum": 0.9, "plateau_factor": 0.5, "plateau_patience": 10,
    # the paper pre-trains with batch norm, but nnU-Net fine-tunes with instance norm: batch-norm weights
    # do not survive the switch (transfer check), so pre-training keeps the plans' instance norm
    "norm": "instance",
}


# ``--optimizer``. SGD's step on the U-Net scales with L_res, which is reported in the window's units
# (std^2 times the standardised error: 0.035 on the phantoms, 0.0075 on the real volumes), so at lr 0.01 the
# U-Net barely moves in short runs; Adam's step does not depend on the loss's scale.
OPTIMIZERS = ("sgd", "adam")
ADAM_LRS = {"lr_unet": 1e-3, "lr_scale": 1e-3, "lr_disc": 1e-4}  # --optimizer adam's, for rates not given
