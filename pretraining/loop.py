"""The pre-training loop: data, optimisation (paper 3.3), logs and checkpoints like nnU-Net's.

SGD with one learning rate per part (U-Net 1.0, S 0.1, M 1e-3), ReduceLROnPlateau on the loss of a
fixed, seeded set of validation cubes from held-out source volumes. Writes into
``$nnUNet_results/D/nnUNetSARPretrain_<variant>__<plans>__<config>/``: a text log, progress.png,
checkpoint_latest.pth (every epoch, for --continue), checkpoint_best.pth (lowest validation loss) and
checkpoint_final.pth, the last two in nnU-Net's ``-pretrained_weights`` format.
"""
import dataclasses
import os
import random
import re
import shutil
from datetime import datetime
from os.path import isdir, isfile, join
from time import time

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p
from torch.utils.data import DataLoader

from nnunet_sar import SARError, __version__, nnunet_folder
from nnunet_sar.checkpoint import (CHECKPOINT_ENV, atomic_save, cpu_state_dict, encoder_keys, load_checkpoint_file,
                                   pretrain_output_folder, unwrap)
from nnunet_sar.files import atomic_write_json
from nnunet_sar.network import build_pretraining_network, load_plans, nnunet_weights
from nnunet_sar.pretraining.corruptions import marking, tune_malloc
from nnunet_sar.pretraining.cubes import (SCALE_NAMES, MultiScaleCubes, check_patch_size, fixed_validation_cubes,
                                         transform_batch)
from nnunet_sar.pretraining.intensity import intensity_maps, normalise_as_nnunet
from nnunet_sar.pretraining.logger import SARLogger
from nnunet_sar.pretraining.objectives import available, objective_class
from nnunet_sar.pretraining.settings import OPTIMIZERS, PretrainSettings
from nnunet_sar.pretraining.sources import preprocess_sources, split_train_val
from nnunet_sar.pretraining.transfer_check import check_transfer


def _on_cpu(obj):
    """``obj`` with every tensor in its dicts, lists and tuples on the CPU (a GPU run's optimizer state:
    nnU-Net's ``-pretrained_weights`` reads a checkpoint without map_location, so a CUDA tensor anywhere in
    it fails to load on a CPU-only machine; ``Optimizer.load_state_dict`` moves the state back to the
    parameters' device on --continue)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _tune_malloc_in_worker(worker_id: int):
    tune_malloc()


def make_optimizer(s: PretrainSettings, groups: list) -> torch.optim.Optimizer:
    """SGD with ``momentum`` (the paper's) or Adam, over the parts' groups at their own learning rates."""
    if s.optimizer == "adam":
        return torch.optim.Adam(groups)
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=s.momentum)
    raise SARError(f"optimizer {s.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def source_cubes_per_volume(settings: PretrainSettings, volumes) -> dict:
    """Cubes per volume (large, medium, small) of every source, by its name. ``cubes_per_source`` keys
    are a source as given in ``sources`` (``SRC:L,M,S`` on the command line) or the start of a source's
    name after ``DatasetNNN_`` (the preset's Table 1: ``LiTS`` matches Dataset503_LiTS); the first wins,
    and other sources get ``cubes_per_volume``."""
    names = list(dict.fromkeys(v.source for v in volumes))  # one name per source, in the order given
    out = {}
    for spec, name in zip(settings.sources, names):
        short = re.sub(r"^(Dataset|Task)\d+_", "", name).casefold()
        by_name = [c for k, c in settings.cubes_per_source.items() if short.startswith(k.casefold())]
        out[name] = [int(c) for c in settings.cubes_per_source.get(spec, by_name[0] if by_name else settings.cubes_per_volume)]
    return out


def default_batch_size(configuration_manager, patch_size) -> int:
    """The plans' batch size, scaled up when the cubes are smaller than the plans' patch (the same
    voxels per batch, so about the same memory): 32x64x64 cubes for 128^3 plans give batch 32."""
    plans_voxels = configuration_manager.batch_size * np.prod(configuration_manager.patch_size)
    return int(max(configuration_manager.batch_size, min(64, plans_voxels // np.prod(patch_size))))


class SARPretrainer:
    """The pre-training loop for any objective of ``pretraining/objectives`` (``settings.objective``): data,
    DDP, workers, AMP, per-part clipping, plateau schedule, atomic checkpoints, exact resume and logs. It
    knows no objective by name."""

    def __init__(self, settings: PretrainSettings):
        try:
            cls = objective_class(settings.objective)
        except KeyError:
            raise SARError(f"unknown --objective {settings.objective!r}; choose from {', '.join(available())}") from None
        self.s = settings
        self.device = torch.device(settings.device)
        self.plans_manager, self.configuration_manager, self.dataset_json = load_plans(
            settings.dataset, settings.plans_identifier, settings.configuration)
        self.dataset_name = self.plans_manager.dataset_name
        self.patch_size = list(settings.patch_size or self.configuration_manager.patch_size)
        try:
            self.objective = cls(settings, self.patch_size)
        except ValueError as e:
            raise SARError(f"--objective {settings.objective}: {e}") from None
        self.run_name = self.objective.run_name
        self.output_folder = pretrain_output_folder(self.dataset_name, self.run_name, settings.plans_identifier,
                                                    settings.configuration)
        self.cube_size = self.objective.cube_size()
        self.batch_size = settings.batch_size or default_batch_size(self.configuration_manager, self.cube_size)
        if settings.transform_on not in ("loader", "device"):
            raise SARError(f"--transform-on {settings.transform_on!r}: 'loader' or 'device'")
        self.is_ddp = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if self.is_ddp else (0, 1)
        if self.is_ddp and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        self.current_epoch = 0
        self.best_val_loss = None
        self.log_file = None
        self.logger = SARLogger()

    # ------------------------------------------------------------------ set-up
    def initialize(self, continue_training: bool = False, overwrite: bool = False):
        s, obj = self.s, self.objective
        try:  # before the (long) preprocessing of the sources
            check_patch_size(self.patch_size, self.configuration_manager.network_arch_init_kwargs["strides"])
        except ValueError as e:
            raise SARError(f"patch size for {s.plans_identifier} / {s.configuration}: {e}") from None
        try:
            obj.check()
        except ValueError as e:
            raise SARError(f"--objective {obj.name}: {e}") from None
        # training cubes are redrawn at the objective's scales (cubes_per_volume), validation cubes are not
        for flag, counts, scales in (("--cubes-per-volume", s.cubes_per_volume, range(3)),
                                     *((f"cubes per volume of source {k}", c, range(3)) for k, c in s.cubes_per_source.items()),
                                     ("--val-cubes-per-volume", s.val_cubes_per_volume, obj.scales)):
            if len(counts) != 3 or min(counts) < 0 or not sum(counts[i] for i in scales):
                raise SARError(f"{flag} {' '.join(map(str, counts))}: give 3 counts >= 0 (1/2, 1/4, 1/8 crops), not all "
                               f"zero at the scales '{self.run_name}' uses ({[SCALE_NAMES[i] for i in scales]})")
        self._prepare_output_folder(continue_training, overwrite)
        torch.manual_seed(s.seed), np.random.seed(s.seed), random.seed(s.seed)
        tune_malloc()  # the cubes are made here when --num-workers is 0 (see corruptions.tune_malloc)
        cache = s.cache_dir or join(nnunet_folder("nnUNet_preprocessed"), "nnUNetSAR_sources")
        if self.rank == 0:
            volumes = preprocess_sources(s.sources, cache, num_processes=max(1, s.num_workers))
        self._barrier()  # the other ranks then only read the cache
        if self.rank != 0:
            volumes = preprocess_sources(s.sources, cache, num_processes=1, progress=False)
        self.source_counts = source_cubes_per_volume(s, volumes)
        self.train_volumes, self.val_volumes = split_train_val(volumes, s.val_fraction, s.seed)
        if not self.val_volumes or not self.train_volumes:
            raise SARError(f"sources {' '.join(s.sources)} hold {len(volumes)} volumes; the held-out validation cubes "
                           f"need at least two cases (--val-fraction {s.val_fraction})")
        self.total_train_volumes = len(self.train_volumes)
        # every variant draws as many cubes per volume as sar, at its own scales (Table 3 at equal steps)
        counts = [obj.cubes_per_volume(self.source_counts[v.source]) for v in self.train_volumes]
        self.cubes_per_epoch = sum(map(sum, counts))
        # DDP: every rank samples its own shard of the training volumes; validation is the same everywhere
        self.train_volumes = self.train_volumes[self.rank::self.world_size]
        if not self.train_volumes:
            raise SARError(f"{self.total_train_volumes} training volumes cannot be shared by {self.world_size} ranks")
        self.modalities = sorted({v.modality for v in volumes})
        obj.setup(self.modalities, self.batch_size)

        unet = build_pretraining_network(self.plans_manager, self.configuration_manager, num_channels=1,
                                         norm=s.norm)
        self.network = obj.build_network(unet).to(self.device)
        if self.is_ddp:
            if self.device.type == "cuda":
                self.network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=obj.transfers != "all")  # an encoder objective leaves the decoder unused
        self.optimizer = make_optimizer(s, self.param_groups())
        self.lr_scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=s.plateau_factor, patience=s.plateau_patience)
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None

        self.transforms = obj.transforms()
        maps = dict(zip((v.path for v in volumes), intensity_maps(  # over all volumes: the same on every rank
            volumes, s.intensity, self.plans_manager, self.configuration_manager)))
        self.train_cubes = MultiScaleCubes(self.train_volumes, self.cube_size,
                                           cubes_per_volume=counts[self.rank::self.world_size],
                                           modalities=self.modalities, seed=s.seed,
                                           transforms=self.transforms if s.transform_on == "loader" else None,
                                           intensity_maps=[maps[v.path] for v in self.train_volumes])
        val_per_volume = [c if i in obj.scales else 0 for i, c in enumerate(s.val_cubes_per_volume)]
        self.val_batch = fixed_validation_cubes(self.val_volumes, self.cube_size, val_per_volume,
                                                marking(self.transforms), seed=s.seed + 1, modalities=self.modalities,
                                                intensity_maps=[maps[v.path] for v in self.val_volumes])
        what = getattr(obj, "description_of_run", f"pre-training '{obj.name}' ({obj.description})")
        self.print_to_log_file(
            f"{what} for {self.dataset_name} / "
            f"{s.plans_identifier} / {s.configuration}: {len(self.train_volumes)} training and "
            f"{len(self.val_volumes)} validation volumes, modalities {self.modalities}, patch {self.patch_size}"
            + (f" (cubes of {self.cube_size})" if self.cube_size != self.patch_size else "") +
            f", batch {self.batch_size}, {self.iterations_per_epoch} iterations per epoch, device {self.device}, "
            f"cube transforms in the {s.transform_on}")
        self.print_to_log_file(
            f"cubes per volume (large, medium, small) by source: {self.source_counts}"
            + (f", drawn at the {'/'.join(SCALE_NAMES[i] for i in obj.scales)} scale only (as many cubes as "
               f"sar)" if len(obj.scales) < 3 else "") + f"; {self.cubes_per_epoch} training cubes per epoch"
            + (f"; preset '{s.preset}'" if s.preset else ""))
        if obj.transfers != "all":
            self.print_to_log_file(f"'{obj.name}' trains the encoder only: fine-tuning takes the encoder, the decoder "
                                   f"keeps nnU-Net's initialisation")
        if continue_training:  # first: a refused resume leaves the run's settings.json as it was
            self.load_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        if self.rank == 0:
            atomic_write_json(join(self.output_folder, "settings.json"), self.settings_dict())

    def param_groups(self) -> list:
        """One optimizer group per part: the U-Net at --lr-unet, every head the objective adds at its own rate."""
        net, obj = self.sar_network, self.objective
        groups = [{"params": list(net.unet.parameters()), "lr": self.s.lr_unet, "name": "unet"}]
        for name, head in self.heads().items():
            groups.append({"params": list(head.parameters()), "lr": obj.head_lr(name), "name": name})
        return groups

    def heads(self) -> dict:
        """The modules the objective adds to the U-Net (saved beside ``network_weights`` under their names)."""
        return {name: m for name, m in self.sar_network.named_children() if name != "unet"}

    def _prepare_output_folder(self, continue_training: bool, overwrite: bool):
        if self.rank != 0:
            return
        latest = join(self.output_folder, "checkpoint_latest.pth")
        if continue_training:
            if not isfile(latest):
                raise SARError(f"--continue: no {latest} to resume from")
        elif isdir(self.output_folder) and os.listdir(self.output_folder):
            if not overwrite:
                raise SARError(f"{self.output_folder} already holds a run; resume it with --continue or replace it "
                               f"with --overwrite")
            shutil.rmtree(self.output_folder)
        try:
            maybe_mkdir_p(self.output_folder)
            self.log_file = join(self.output_folder, datetime.now().strftime("training_log_%Y_%m_%d_%H_%M_%S.txt"))
            open(self.log_file, "a").close()
        except OSError as e:
            raise SARError(f"cannot write to {self.output_folder}: {e.strerror}") from None

    @property
    def sar_network(self) -> torch.nn.Module:
        """The objective's network (U-Net and heads) without DDP's wrapper."""
        return unwrap(self.network)

    @property
    def iterations_per_epoch(self) -> int:
        """The same on every rank (DDP needs that): all training cubes of an epoch / the global batch."""
        return self.s.iters_per_epoch or max(1, self.cubes_per_epoch // (self.batch_size * self.world_size))

    def _barrier(self):
        if self.is_ddp:
            dist.barrier()

    def settings_dict(self) -> dict:
        obj = self.objective
        return {**dataclasses.asdict(self.s), "variant": self.run_name, "dataset_name": self.dataset_name,
                "modalities": self.modalities, "transfers": obj.transfers, "scales": list(obj.scales), **obj.record(),
                "objective_options": dataclasses.asdict(obj.options) if obj.options is not None else {},
                "batch_size": self.batch_size, "patch_size": self.patch_size, "cube_size": self.cube_size,
                "cubes_per_volume_by_source": self.source_counts, "cubes_per_epoch": self.cubes_per_epoch,
                "iterations_per_epoch": self.iterations_per_epoch,
                "network_class": self.configuration_manager.network_arch_class_name, "num_input_channels": 1,
                "nnunet_sar_version": __version__}

    def print_to_log_file(self, *args):
        if self.rank != 0:
            return
        line = f"{datetime.now()}: " + " ".join(str(a) for a in args)
        print(line, flush=True)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    # ------------------------------------------------------------------ one epoch
    def _loader(self):
        """This epoch's cubes as (plan, index) keys: a cube depends only on its key, whatever the workers.
        An epoch longer than one plan (--iters-per-epoch) continues into further plans."""
        n, per_plan = self.iterations_per_epoch * self.batch_size, len(self.train_cubes)
        keys = [(self.current_epoch * 1_000_003 + j // per_plan, j % per_plan) for j in range(n)]
        return DataLoader(self.train_cubes, batch_size=self.batch_size, sampler=keys, drop_last=True,
                          num_workers=self.s.num_workers, pin_memory=self.device.type == "cuda",
                          worker_init_fn=_tune_malloc_in_worker)

    def _step(self, batch: dict, train: bool, seeds=None) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if seeds is not None:  # --transform-on device: the loader's per-cube seeds, here on the batch's device
            batch = transform_batch(self.transforms, batch, seeds)
        if self.s.intensity != "unit":  # transformed in the [0, 1] window, then normalised as nnU-Net will show them
            batch = normalise_as_nnunet(batch)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            terms = self.objective.terms(self.network, batch)
        if train:
            self.optimizer.zero_grad(set_to_none=True)
            loss = terms["total"]
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
                self.grad_scaler.unscale_(self.optimizer)
                self._clip_gradients()
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                loss.backward()
                self._clip_gradients()
                self.optimizer.step()
        return {k: v.detach().item() for k, v in terms.items()}

    def _clip_gradients(self, max_norm: float = 12.0):
        """nnU-Net's norm clipping, per player (U-Net, S, M): one joint norm would let the U-Net's large
        restoration gradient (beta = 10) shrink the heads' steps to nothing."""
        for group in self.optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], max_norm)

    def batches(self):
        """This epoch's (batch, seeds): ``seeds`` are the per-cube transform seeds ``_step`` uses under
        ``--transform-on device`` (the loader then hands clean cubes), else None (transformed in the loader)."""
        loader = self._loader()
        keys, bs = list(loader.sampler), self.batch_size
        on_device = self.s.transform_on == "device" and self.transforms is not None
        for j, batch in enumerate(loader):
            yield batch, [self.train_cubes.transform_seed(k) for k in keys[j * bs:(j + 1) * bs]] if on_device else None

    def train_epoch(self) -> dict:
        self.network.train()
        results = [self._step(batch, train=True, seeds=seeds) for batch, seeds in self.batches()]
        means = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
        if self.is_ddp:  # the mean over all ranks, for the log
            t = torch.tensor([means[k] for k in sorted(means)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            means = dict(zip(sorted(means), (t / self.world_size).tolist()))
        return means

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss terms on the fixed validation cubes. With batch norm the statistics of the batch are used,
        as Models Genesis' ContBatchNorm3d does: running averages over a few noisy pre-training steps
        would make the plateau schedule follow noise."""
        self.network.train(self.s.norm == "batch")
        n, results = len(self.val_batch["image"]), []
        for i in range(0, n, self.batch_size):
            batch = {k: v[i:i + self.batch_size] for k, v in self.val_batch.items()}
            results.append((len(batch["image"]), self._step(batch, train=False)))
        return {k: float(sum(m * r[k] for m, r in results) / n) for k in results[0][1]}

    def _check_finite(self, terms: dict, where: str):
        for k, v in terms.items():
            if not np.isfinite(v):
                latest = join(self.output_folder, "checkpoint_latest.pth")
                kept = f"the last good checkpoint {latest} is kept" if isfile(latest) else "no epoch finished yet"
                raise SARError(f"non-finite {where} loss term '{k}' = {v} in epoch {self.current_epoch + 1}; {kept} "
                               f"(try lower learning rates, e.g. --lr-unet 0.001)")

    # ------------------------------------------------------------------ the run
    def run_training(self):
        while self.current_epoch < self.s.epochs:
            start = time()
            train = self.train_epoch()
            self._check_finite(train, "training")
            val = self.validate()
            self._check_finite(val, "validation")
            self.lr_scheduler.step(val["scheduled"])
            self.on_epoch_end(start, train, val)
        if self.is_ddp:
            self._check_ranks_agree()
        final = join(self.output_folder, "checkpoint_final.pth")
        self.save_checkpoint(final)
        if self.rank == 0:  # does nnU-Net's network do what this one learned? (transfer_check.json / .png)
            check_transfer(final, self.val_batch, self.batch_size, self.device, log=self.print_to_log_file,
                           objective=self.objective)
        self.print_to_log_file(f"done: {final}")
        self.print_to_log_file(self.handed_on())

    def handed_on(self) -> str:
        """Which weights fine-tuning loads. The last epoch's: the plateau schedule has by then shrunk the
        steps, so it differs from the lowest validation loss mostly by the noise of a few fixed cubes (on
        which that minimum is selected, the scheduled loss without the adversarial term); and the transfer
        check measured this file. Models Genesis hands on its best validation model instead."""
        losses = self.logger.my_fantastic_logging["val_loss"]
        if not losses:
            return "fine-tuning loads checkpoint_final.pth (no epoch trained)"
        best = int(np.argmin(losses))
        return (f"fine-tuning loads checkpoint_final.pth (epoch {len(losses)}, validation loss "
                f"{losses[-1]:.4g}); the lowest validation loss, {losses[best]:.4g} at epoch {best + 1}, is in "
                f"checkpoint_best.pth: {CHECKPOINT_ENV}={join(self.output_folder, 'checkpoint_best.pth')} hands that "
                f"on instead (Models Genesis' choice)")

    def _check_ranks_agree(self):
        """DDP keeps the weights identical on every rank; verified once at the end, and logged."""
        flat = torch.cat([p.detach().double().flatten() for p in self.sar_network.parameters()])
        summary = torch.stack([flat.sum(), flat.abs().sum(), flat.square().sum()])
        gathered = [torch.zeros_like(summary) for _ in range(self.world_size)]
        dist.all_gather(gathered, summary)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise SARError(f"weights differ between DDP ranks: {[g.tolist() for g in gathered]}")
        self.print_to_log_file(f"weights identical on all {self.world_size} ranks")

    def on_epoch_end(self, start: float, train: dict, val: dict):
        e, log = self.current_epoch, self.logger
        terms = [k for k in val if k not in ("total", "scheduled")]
        for k in terms:  # whatever terms the objective returns
            log.log(f"train_{k}", train.get(k, np.nan), e)
            log.log(f"val_{k}", val[k], e)
        log.log("val_loss", val["scheduled"], e)
        for group in self.optimizer.param_groups:
            log.log(f"lr_{group['name']}", group["lr"], e)
        log.log("epoch_start_timestamps", start, e)
        log.log("epoch_end_timestamps", time(), e)
        parts = [f"{k} {train.get(k, np.nan):.4g}/{val[k]:.4g}" for k in terms if not k.endswith("_acc")]
        accs = [f"{k} {val[k]:.2f}" for k in terms if k.endswith("_acc")]
        self.print_to_log_file(f"epoch {e + 1}/{self.s.epochs} train/val: " + ", ".join(parts)
                               + (f" (val {', '.join(accs)})" if accs else "")
                               + f"; lr {self.optimizer.param_groups[0]['lr']:.3g}; {time() - start:.1f} s")
        if self.rank == 0:
            log.plot_progress_png(self.output_folder, title=f"pre-training '{self.run_name}'")
        self.current_epoch += 1
        if self.best_val_loss is None or val["scheduled"] < self.best_val_loss:
            self.best_val_loss = val["scheduled"]
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, fname: str):
        if self.rank != 0:
            return
        net = self.sar_network
        heads = {name: cpu_state_dict(m) for name, m in self.heads().items()}
        unet = cpu_state_dict(net.unet)
        weights = nnunet_weights(unet)
        atomic_save({
            "objective": self.objective.name,
            "trained_keys": self.trained_keys(weights),
            "heads": sorted(heads),
            "network_weights": weights,  # exactly nnU-Net's keys: the -pretrained_weights format
            "norm_statistics": {k: v for k, v in unet.items() if k not in weights},  # batch norm, for --continue
            **heads,
            "optimizer_state": _on_cpu(self.optimizer.state_dict()),  # loadable without a GPU (nnU-Net: no map_location)
            "lr_scheduler_state": self.lr_scheduler.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "current_epoch": self.current_epoch,
            "best_val_loss": self.best_val_loss,
            "rng_states": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "trainer_name": f"nnUNetSARPretrain_{self.run_name}",
            "settings": self.settings_dict(),
        }, fname)

    def trained_keys(self, weights: dict) -> list:
        """The keys of ``network_weights`` this objective trains (what fine-tuning may take over)."""
        if self.objective.transfers == "all":
            return sorted(weights)
        encoder = encoder_keys(self.sar_network.unet)
        return sorted(k for k in weights if k in encoder)

    # what a resumed run must share with its checkpoint: the network and its task, the cubes (sources, seed, split,
    # counts, corruptions; the validation loss the plateau and the best checkpoint compare) and the optimisation
    # (a new rate would be overwritten by the restored optimizer). Epochs, device and workers may change.
    RESUME_MUST_MATCH = ("objective", "variant", "objective_options", "norm", "restoration_target", "intensity",
                         "modalities", "adversarial", "scale_loss", "patch_size", "batch_size", "sources", "seed",
                         "val_fraction", "val_cubes_per_volume", "cubes_per_volume", "cubes_per_source", "corruptions",
                         "alpha", "beta", "adv_weight", "optimizer", "lr_unet", "lr_scale", "lr_disc", "momentum",
                         "plateau_patience", "plateau_factor")

    def load_checkpoint(self, fname: str):
        ckpt = load_checkpoint_file(fname)
        saved, now = ckpt.get("settings") or {}, self.settings_dict()
        saved = {"restoration_target": "absolute", **saved} if saved else saved  # runs from before the option
        differ = [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in self.RESUME_MUST_MATCH
                  if k in saved and saved[k] != now[k]]
        if differ:
            raise SARError(f"--continue: {fname} was made with other settings ({'; '.join(differ)}); resume with the "
                           f"same options or start again with --overwrite")
        net = self.sar_network
        net.unet.load_state_dict({**ckpt["network_weights"], **ckpt.get("norm_statistics", {})})
        for name, head in self.heads().items():
            head.load_state_dict(ckpt[name])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state"):
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.logger.load_checkpoint(ckpt["logging"])
        self.current_epoch, self.best_val_loss = ckpt["current_epoch"], ckpt["best_val_loss"]
        rng = ckpt["rng_states"]
        torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.print_to_log_file(f"resumed from {fname} at epoch {self.current_epoch}")
