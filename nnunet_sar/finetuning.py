"""The fine-tuning side: nnU-Net's trainer, started from a SAR checkpoint.

``SARInitialisation`` is a mixin for any nnUNetTrainer: after nnU-Net's own ``initialize()`` has built
the network from the plans, it loads the pre-training checkpoint of the same dataset, plans and
configuration (variant ``pretraining_variant``), verifying every tensor and logging how many it
loaded and from where. Nothing is frozen. The named trainers live in ``trainers/`` (installed into
nnU-Net's trainer folder) and are one or two lines each.
"""
import os
from os.path import join

import torch
from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p, save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sar import SARError
from nnunet_sar.checkpoint import find_pretrained_checkpoint, load_pretrained_into


class SARInitialisation:
    """Loads the pre-trained weights after nnU-Net's own ``initialize()``: ``transfer_parts`` 'encoder'
    (the default: the decoder keeps nnU-Net's initialisation) or 'all' (encoder and decoder, as the paper),
    and prints what the run's transfer check measured, so that a starting point that does not do what
    pre-training did is seen in the fine-tuning log."""
    pretraining_variant = "sar"
    transfer_parts = "encoder"  # measured: a restoration decoder stalls the start (BENCHMARKS.md, transfer)

    def initialize(self):
        was_initialized = self.was_initialized
        super().initialize()
        if was_initialized:
            return
        if getattr(self, "_loading_fold_checkpoint", False):
            self.print_to_log_file("SAR: resuming from the fold's own checkpoint (it replaces every weight); the "
                                   "pre-training checkpoint is not read")
            return
        fname = find_pretrained_checkpoint(self.plans_manager.dataset_name, self.pretraining_variant,
                                           self.plans_manager.plans_name, self.configuration_name,
                                           plans=self.plans_manager.plans)
        n = load_pretrained_into(self.network, fname, log=self.print_to_log_file, parts=self.transfer_parts)
        what = "all but the seg layers" if self.transfer_parts == "all" else \
            "the encoder only; the decoder keeps nnU-Net's initialisation"
        self.print_to_log_file(f"SAR: loaded {n} pre-trained tensors ({what}) from {fname}")
        report = transfer_check_summary(fname)
        if report:
            self.print_to_log_file(report)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnUNetv2_train --c and --val load the fold's checkpoint, which nnU-Net starts by calling initialize():
        the pre-training file is then neither loaded nor needed (it may have moved since the fold began)."""
        self._loading_fold_checkpoint = True
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            self._loading_fold_checkpoint = False


class LearningRateWarmup:
    """A linear learning-rate warm-up before nnU-Net's poly schedule, per iteration, as mainline nnU-Net
    and Wald et al. (CVPR 2025) fine-tune pre-trained networks: early full-size steps (lr 1e-2, momentum
    0.99) would overwrite what pre-training learned before the new segmentation layers fit it.

    ``warmup`` 'linear': lr rises from initial_lr / W to initial_lr over the first W iterations, then
    nnU-Net's poly schedule takes over. 'sawtooth': the decoder (and seg layers) warm up alone for W
    iterations while the encoder stays put (lr 0), then the whole network warms up for W more. None: no
    warm-up. W = ``warmup_fraction`` of all training iterations, at least one (nnU-Net's 1000 x 250
    iterations: 12,500, i.e. 50 epochs; the demo's 3 x 10: 2). Proportional only: a fixed minimum of 5
    cost the demo's 30 iterations more than the pre-trained start gave (BENCHMARKS.md, transfer)."""
    warmup = "linear"
    warmup_fraction = 0.05

    @property
    def warmup_iterations(self) -> int:
        total = self.num_epochs * self.num_iterations_per_epoch
        return max(1, int(round(self.warmup_fraction * total)))

    def configure_optimizers(self):
        optimizer, lr_scheduler = super().configure_optimizers()
        if self.warmup == "sawtooth":  # two groups, so that the encoder can wait while the decoder adapts
            from nnunet_sar.checkpoint import encoder_keys, unwrap
            module = unwrap(self.network)
            enc = encoder_keys(module)
            named = dict(module.named_parameters())
            encoder_ids = {id(p) for k, p in named.items() if k in enc}
            params = [p for g in optimizer.param_groups for p in g["params"]]
            optimizer.param_groups.clear()  # no state yet: regroup with the optimizer's own defaults
            optimizer.add_param_group({"params": [p for p in params if id(p) in encoder_ids], "name": "encoder"})
            optimizer.add_param_group({"params": [p for p in params if id(p) not in encoder_ids], "name": "decoder"})
        return optimizer, lr_scheduler

    def on_train_start(self):
        super().on_train_start()
        if self.warmup not in ("linear", "sawtooth", None):
            raise ValueError(f"unknown warmup {self.warmup!r}: 'linear', 'sawtooth' or None")
        if self.warmup:
            self.print_to_log_file(f"learning-rate warm-up '{self.warmup}': {self.warmup_iterations} iterations"
                                   f"{' per phase (decoder alone, then all)' if self.warmup == 'sawtooth' else ''}"
                                   f" up to {self.initial_lr}, then nnU-Net's poly schedule")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # nnU-Net's poly step for this epoch
        self._iteration_in_epoch = 0

    def train_step(self, batch: dict) -> dict:
        self.warmup_step()
        return super().train_step(batch)

    def warmup_step(self) -> None:
        """Sets this iteration's learning rates (within the warm-up; afterwards nnU-Net's poly rules)."""
        k = getattr(self, "_iteration_in_epoch", 0)  # 0 when train_step runs outside nnU-Net's epoch loop
        iteration, self._iteration_in_epoch = self.current_epoch * self.num_iterations_per_epoch + k, k + 1
        if not self.warmup:
            return
        w = self.warmup_iterations
        phase, k = divmod(iteration, w)
        if self.warmup == "linear" and phase == 0:
            for group in self.optimizer.param_groups:
                group["lr"] = self.initial_lr * (k + 1) / w
        elif self.warmup == "sawtooth" and phase < 2:
            for group in self.optimizer.param_groups:
                frozen = phase == 0 and group.get("name") == "encoder"
                group["lr"] = 0.0 if frozen else self.initial_lr * (k + 1) / w
        elif iteration == w * (2 if self.warmup == "sawtooth" else 1):
            self.lr_scheduler.step(self.current_epoch)  # ended mid-epoch: poly's rate for the rest of it


def transfer_check_summary(checkpoint_file: str) -> str | None:
    """One line on what the pre-training run's transfer check measured (transfer_check.json beside the
    checkpoint), or None when there is none."""
    import json
    fname = os.path.join(os.path.dirname(os.path.abspath(checkpoint_file)), "transfer_check.json")
    if not os.path.isfile(fname):
        return None
    with open(fname) as f:
        r = json.load(f)
    if "summary" in r:
        return f"SAR transfer check ({fname}): {r['summary']}"
    return (f"SAR transfer check ({fname}): restoration MSE on held-out cubes, pre-training network "
            f"{r['pretraining_network']:.4g}, this (fine-tuning) network {r['finetuning_network']:.4g}, corrupted "
            f"input {r['corrupted_input']:.4g}, cube mean {r['cube_mean']:.4g}: {r['verdict']}")


def seed_everything(seed: int) -> None:
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _whole_number_from_env(name: str, minimum: int) -> int | None:
    """Environment variable ``name`` as a whole number >= ``minimum``, or None when it is not set."""
    value = os.environ.get(name, "")
    if value and (not value.isdigit() or int(value) < minimum):
        raise SARError(f"{name}={value!r}: expected a whole number >= {minimum}")
    return int(value) if value else None


def demo_epochs() -> int:
    """The demo schedule's number of epochs: 3, or ``nnUNet_SAR_demo_epochs``."""
    epochs = _whole_number_from_env("nnUNet_SAR_demo_epochs", 1)
    return 3 if epochs is None else epochs


class DemoSchedule:
    """A few short epochs, for nnunet_sar_demo and the tests on a CPU. (nnU-Net records the arguments
    of ``__init__`` by signature, so it must be spelled out.)

    ``nnUNet_SAR_seed=N`` seeds the run (nnU-Net seeds nothing): the same network initialisation before it is
    built, and the same batches and augmentations from the first iteration, whatever the trainer. Arms that
    share a seed then differ only in what they change (the pre-trained encoder, the warm-up), which makes
    the transfer benchmark's comparisons paired (with ``nnUNet_n_proc_DA=0`` on the CPU, runs repeat exactly).
    The data's seed is N + ``data_seed_offset``, not N: with one seed for both, torch's generator would restart
    at training on the stream that drew the network, coupling scratch's draw to its augmentations (and scratch
    alone: an arm that loads other weights breaks it). That coupling favoured seeded scratch by 0.02 Dice on the
    faint target (BENCHMARKS.md, "a seeded scratch that the seeding favours").
    ``nnUNet_SAR_demo_epochs=N`` lengthens the schedule to N epochs of 10 iterations (``nnunet_sar_benchmark
    --transfer --finetune-epochs``: every arm at one length, e.g. on a GPU), the warm-up staying proportional."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = demo_epochs()
        self.sar_seed = _whole_number_from_env("nnUNet_SAR_seed", 0)
        self.num_iterations_per_epoch = 10
        self.num_val_iterations_per_epoch = 3

    data_seed_offset = 500_000  # the batches' and augmentations' seed is nnUNet_SAR_seed + this

    def _seed(self, offset: int = 0):
        if self.sar_seed is not None:
            seed_everything(self.sar_seed + offset)

    def initialize(self):
        if not self.was_initialized:
            self._seed()  # the same initialisation in every arm (the pre-trained weights are loaded over it)
        super().initialize()

    def on_train_start(self):
        super().on_train_start()
        self._seed(self.data_seed_offset)  # the same batches and augmentations in every arm


class nnUNetTrainerSAR(SARInitialisation, LearningRateWarmup, nnUNetTrainer):
    """nnU-Net's default recipe, initialised from SAR pre-training, with a learning-rate warm-up."""


# ------------------------------------------------------------------ the paper's fine-tuning recipe (3.3)
class ValidationLossPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """ReduceLROnPlateau driven by nnU-Net's logged validation loss.

    nnU-Net calls ``lr_scheduler.step(current_epoch)`` at the start of every epoch; for a plateau
    schedule that epoch number would be read as the monitored metric. So ``step`` ignores its
    arguments, and ``PaperFineTuning.on_epoch_end`` calls ``step_on_validation_loss`` instead."""

    def step(self, *args, **kwargs):  # noqa: D102 - nnU-Net's per-epoch call, deliberately a no-op
        pass

    def step_on_validation_loss(self, val_loss: float) -> None:
        super().step(float(val_loss))


PLATEAU_SEED = 54321  # not FRACTION_SEED: the carve-out is then no frac5 subset


class PaperFineTuning:
    """The paper's fine-tuning recipe (3.3): Adam with lr 1e-3, Dice loss only, ReduceLROnPlateau on
    the validation loss; all layers trainable. Everything else (epochs, augmentation, deep supervision,
    patch and batch size) stays nnU-Net's.

    The validation loss the plateau reads comes from a seeded 1/``plateau_denominator`` of the fold's
    training cases (``plateau_split.json`` beside the fold), never from the fold's validation cases:
    with ``nnunet_sar_split`` those are the test cases that ``validation/summary.json`` scores.

    Dice only is nnU-Net's own compound loss with the cross-entropy weight 0 (so ignore labels and
    regions are handled as in nnU-Net). The plateau state is not part of nnU-Net's checkpoint; on
    ``--c`` (resume) it is rebuilt by replaying the logged validation losses."""

    warmup = None            # the paper's recipe has none (nnUNetTrainerSAR's warm-up is not applied here)
    transfer_parts = "all"   # the paper transfers the encoder-decoder (3.3)
    plateau_factor = 0.5     # as the pre-training schedule (paper 3.3 names no values)
    plateau_patience = 10    # epochs (nnU-Net epochs: 250 iterations each)
    min_lr = 1e-6
    plateau_denominator = 5  # 1/5 of the training cases, nnU-Net's own validation share (the paper names none)
    plateau_seed = PLATEAU_SEED
    _splitting_for_training = False

    def get_tr_and_val_datasets(self):
        """nnU-Net's per-epoch validation (its loss drives the plateau; its Dice picks checkpoint_best)
        runs on the carved-out cases; ``perform_actual_validation`` calls ``do_split`` directly and still
        scores the fold's validation cases."""
        self._splitting_for_training = True
        try:
            return super().get_tr_and_val_datasets()
        finally:
            self._splitting_for_training = False

    def do_split(self):
        tr_keys, val_keys = super().do_split()  # after TrainingFraction, when combined: carved from the fraction
        if not self._splitting_for_training:
            return tr_keys, val_keys
        if len(tr_keys) < 2:
            raise SARError(f"fold {self.fold} has {len(tr_keys)} training case(s); the plateau's validation split "
                           f"needs at least 2")
        plateau = nested_fraction(tr_keys, self.plateau_denominator, self.plateau_seed)
        train = sorted(set(tr_keys) - set(plateau))
        record = {"seed": self.plateau_seed, "fraction": f"1/{self.plateau_denominator}", "train": train,
                  "plateau_validation": plateau, "scored_validation": sorted(val_keys)}
        if self.local_rank == 0:
            maybe_mkdir_p(self.output_folder)
            save_json(record, join(self.output_folder, "plateau_split.json"), sort_keys=False)
        self.print_to_log_file(f"ReduceLROnPlateau reads the validation loss of {len(plateau)} of the {len(tr_keys)} "
                               f"training cases (1/{self.plateau_denominator}, seed {self.plateau_seed}; "
                               f"plateau_split.json), trains on {len(train)}; the {len(val_keys)} validation cases "
                               f"are scored only at the end")
        return train, plateau

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr)
        return optimizer, ValidationLossPlateau(optimizer, mode="min", factor=self.plateau_factor,
                                                patience=self.plateau_patience, min_lr=self.min_lr)

    def _build_loss(self):
        import numpy as np
        from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        dice = {"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "ddp": self.is_ddp}
        if self.label_manager.has_regions:
            loss = DC_and_BCE_loss({}, {**dice, "do_bg": True}, weight_ce=0, weight_dice=1,
                                   use_ignore_label=self.label_manager.ignore_label is not None,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        else:
            loss = DC_and_CE_loss({**dice, "do_bg": False}, {}, weight_ce=0, weight_dice=1,
                                  ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
        if self._do_i_compile():
            loss.dc = torch.compile(loss.dc)
        if self.enable_deep_supervision:  # as nnU-Net's default loss
            weights = np.array([1 / (2 ** i) for i in range(len(self._get_deep_supervision_scales()))])
            weights[-1] = 1e-6 if self.is_ddp and not self._do_i_compile() else 0
            loss = DeepSupervisionWrapper(loss, weights / weights.sum())
        return loss

    def on_epoch_end(self):
        before = self.optimizer.param_groups[0]["lr"]
        self.lr_scheduler.step_on_validation_loss(self.logger.get_value("val_losses", step=-1))
        after = self.optimizer.param_groups[0]["lr"]
        if after != before:
            self.print_to_log_file(f"ReduceLROnPlateau: validation loss has not improved for "
                                   f"{self.plateau_patience} epochs, learning rate {before:.3g} -> {after:.3g}")
        super().on_epoch_end()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        # nnU-Net saves no scheduler state: replay the logged validation losses on a fresh schedule
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr
        self.lr_scheduler = ValidationLossPlateau(self.optimizer, mode="min", factor=self.plateau_factor,
                                                  patience=self.plateau_patience, min_lr=self.min_lr)
        for val_loss in self.logger.get_value("val_losses", step=None)[:self.current_epoch]:
            self.lr_scheduler.step_on_validation_loss(val_loss)


# -------------------------------------------------------------- training on a fraction of the labels (Table 4)
FRACTION_SEED = 12345


def nested_fraction(keys, denominator: int, seed: int = FRACTION_SEED) -> list:
    """1/denominator of `keys` (at least one): the first round(n / denominator) of one seeded permutation
    of the sorted keys. The permutation depends only on the keys and the seed, so every trainer (SAR or
    from scratch) gets the same subset, and smaller fractions lie inside larger ones."""
    import numpy as np
    keys = sorted(keys)
    if denominator < 1:
        raise ValueError(f"fraction denominator must be >= 1, got {denominator}")
    order = np.random.RandomState(seed).permutation(len(keys))
    n = max(1, int(round(len(keys) / denominator)))
    return sorted(keys[i] for i in order[:n])


class TrainingFraction:
    """Trains on 1/``fraction_denominator`` of the fold's training cases (paper 4.0.3); the validation
    cases stay those of the fold. See ``nested_fraction``."""

    fraction_denominator = 1
    fraction_seed = FRACTION_SEED

    def do_split(self):
        tr_keys, val_keys = super().do_split()
        subset = nested_fraction(tr_keys, self.fraction_denominator, self.fraction_seed)
        self.print_to_log_file(f"Training fraction 1/{self.fraction_denominator}: {len(subset)} of {len(tr_keys)} "
                               f"training cases (seed {self.fraction_seed}); {len(val_keys)} validation cases")
        return subset, val_keys
