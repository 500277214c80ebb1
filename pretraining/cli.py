"""``nnunet_sar_pretrain``: SAR pre-training for a target dataset's nnU-Net plans."""
import argparse
import copy
import dataclasses
import os
import re
import sys

from nnunet_sar import console_main

EPILOG = """
examples:
  nnunet_sar_pretrain -d 501 --preset paper --sources Dataset502_LUNA16 Dataset503_LiTS Dataset504_BraTS2018src Dataset505_Heart
  nnunet_sar_pretrain -d 501 --preset paper --batch-size 16 --sources 502 503 504 505
  nnunet_sar_pretrain -d Dataset501_BraTSFLAIR -p nnUNetResEncUNetMPlans --sources /data/ct_folder:CT 504
  nnunet_sar_pretrain -d 501 --sources 502 504 --variant genesis --epochs 50 -device cpu

A SRC is an nnU-Net raw dataset (name or id, under $nnUNet_raw) or a folder of images. Every image
channel is its own single-channel volume. Modality: channel name CT is CT, anything else MRI; a
':CT' or ':MRI' suffix overrides and is required for a plain folder. A further ':L,M,S' suffix gives that
source its own cubes per volume at 1/2, 1/4, 1/8 of the side (e.g. 503:32,32,64 or /data/ct:CT:16,16,32).

--preset paper sets the paper's configuration (3.1-3.3): cube 32 64 64 (nnU-Net's z, y, x order of the
paper's 64x64x32), batch 32 (the paper gives none: nnU-Net's 2 x 128^3 voxels), Table 1's cubes per
volume by source (LUNA16 and BraTS 16,16,32; LiTS and MSD Heart 32,32,64, matched by the start of the
source's name after DatasetNNN_; other sources get --cubes-per-volume), SGD at lr 1.0 / 0.1 / 1e-3
(U-Net / S / M), alpha 1, beta 10, ReduceLROnPlateau. Options given explicitly override the preset; the
values it set are recorded in settings.json ("preset", "preset_values").

--objective picks the pre-training task (module pretraining/objectives/NAME.py): sar (default; --variant
picks its ablations), genesis, mae, rot, rpl, jigsaw, cpc; each has a fine-tuning trainer (README).

Output: $nnUNet_results/<dataset>/nnUNetSARPretrain_<run>__<plans>__<configuration>/checkpoint_final.pth,
<run> = the SAR variant or the objective's name, which nnUNetv2_train <dataset> <configuration> FOLD -tr
nnUNetTrainerSAR (nnUNetTrainerMAE, nnUNetTrainerRot, ...) loads by itself.
"""


def _key_value(text: str) -> tuple[str, float]:
    from nnunet_sar.pretraining.corruptions import GENESIS_PROBABILITIES
    key, _, value = text.partition("=")
    if key not in GENESIS_PROBABILITIES:
        raise argparse.ArgumentTypeError(f"unknown corruption {key!r}; known: {', '.join(GENESIS_PROBABILITIES)}")
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a probability must lie in [0, 1]")
    return key, p


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``. Zero or a negative size would otherwise be taken for "the
    default" (``--batch-size 0``) or fail deep in the loop after the sources' preprocessing."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {minimum}")
        return value
    return parse


def _fraction(text: str) -> float:
    """--val-fraction: a share in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value}: a share of the source cases must lie in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    from nnunet_sar.pretraining.corruptions import GENESIS_PROBABILITIES
    from nnunet_sar.pretraining.settings import ADAM_LRS, OPTIMIZERS, PretrainSettings
    from nnunet_sar.pretraining.objectives import available, objective_class
    from nnunet_sar.pretraining.objectives.sar import VARIANTS
    d = PretrainSettings(dataset="", sources=[])
    defaults = {f.name: getattr(d, f.name) for f in dataclasses.fields(PretrainSettings)}

    def setting(name: str, text: str = "", **kw):
        """An option of PretrainSettings' field ``name``: flag, default and type derived from the dataclass."""
        default = defaults[name]
        if isinstance(default, (int, float, str)) and not isinstance(default, bool) and "choices" not in kw:
            kw.setdefault("type", type(default))
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=default, help=text, **kw)

    p = argparse.ArgumentParser(
        prog="nnunet_sar_pretrain", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Scale-Aware Restoration (SAR) self-supervised pre-training of the U-Net that nnU-Net builds "
                    "from a target dataset's plans (run nnUNetv2_plan_and_preprocess for it first).")
    p.add_argument("-d", dest="dataset", required=True, help="target dataset name or id (its plans define the network)")
    p.add_argument("-p", dest="plans_identifier", default=d.plans_identifier, help="plans identifier [%(default)s]")
    p.add_argument("-c", dest="configuration", default=d.configuration, help="configuration [%(default)s]")
    p.add_argument("--sources", nargs="+", required=True, metavar="SRC", help="pre-training sources, see below")
    p.add_argument("--preset", choices=["paper"], default=None,
                   help="the paper's configuration, see below; options given explicitly override it")
    p.add_argument("--objective", default=d.objective, choices=available(),
                   help="; ".join(f"{k}: {objective_class(k).description}".replace("%", "%%") for k in available()) + " [%(default)s]")
    p.add_argument("--variant", default=d.variant, choices=list(VARIANTS),
                   help="SAR's ablations (--objective sar): " + "; ".join(
                       f"{k}: {v.description}" for k, v in VARIANTS.items()) + " [sar]")
    setting("transform_on", choices=["loader", "device"], text="where the objective's cube transforms (corruptions, masks, rotations) run: in the data loader "
                        "or batched on the training device; the same per-cube seeds either way [%(default)s]")
    add_objective_options(p)
    setting("epochs", "[%(default)s]", type=_at_least(1))
    p.add_argument("--iters-per-epoch", type=_at_least(1), default=None,
                   help="iterations per epoch [all cubes of --cubes-per-volume for every training volume]")
    p.add_argument("--batch-size", type=_at_least(1), default=None, help="[the plans' batch size]")
    p.add_argument("--patch-size", type=_at_least(1), nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="input cube size in nnU-Net's axis order, e.g. the paper's 32 64 64 (its 64x64x32 is x, y, z) "
                        "[the plans' patch size]")
    p.add_argument("--cubes-per-volume", type=_at_least(0), nargs=3, default=d.cubes_per_volume, metavar=("L", "M", "S"),
                   help="cubes per volume and epoch at 1/2, 1/4, 1/8 of the side, for sources without their own "
                        "(Table 1: LUNA16 and BraTS 16 16 32, LiTS and MSD Heart 32 32 64) [16 16 32]")
    p.add_argument("--val-cubes-per-volume", type=_at_least(0), nargs=3, default=d.val_cubes_per_volume, metavar=("L", "M", "S"),
                   help="fixed validation cubes per held-out volume (the paper gives no number) [2 2 4]")
    p.add_argument("--corruption", nargs="+", default=[], metavar="KEY=P", type=_key_value,
                   help="override Models Genesis' corruption rates: " + " ".join(
                       f"{k}={v}" for k, v in GENESIS_PROBABILITIES.items()))
    setting("val_fraction", "share of source cases held out for the validation loss [%(default)s]", type=_fraction)
    setting("alpha", "weight of L_scale (paper: 1) [%(default)s]")
    setting("beta", "weight of L_res (paper: 10) [%(default)s]")
    setting("adv_weight", "gradient-reversal weight of L_adv on the encoder; 0 trains M as a probe only [%(default)s]")
    setting("optimizer", choices=list(OPTIMIZERS), text="'sgd' (the paper's, with --momentum) or 'adam', whose learning "
            "rates default to " + " / ".join(f"{v:g}" for v in ADAM_LRS.values()) + " (U-Net / S / M) [%(default)s]")
    setting("lr_unet", "learning rate of the U-Net (paper, SGD: 1.0) [%(default)s with sgd]")
    setting("lr_scale", "learning rate of S (paper: 0.1) [%(default)s with sgd]")
    setting("lr_disc", "learning rate of M (paper: 1e-3) [%(default)s with sgd]")
    setting("momentum", "SGD momentum of every part [%(default)s]")
    setting("plateau_patience", "ReduceLROnPlateau patience", type=_at_least(0))
    p.add_argument("--num-workers", type=_at_least(0), default=None,
                   help="data loading worker processes [nnUNet_n_proc_DA, else 4 on a GPU and 0 on the CPU]")
    p.add_argument("--cache-dir", default=None, help="preprocessed sources [$nnUNet_preprocessed/nnUNetSAR_sources]")
    setting("norm", choices=["batch", "instance"], text="normalisation while pre-training: the plans' own (instance norm, what nnU-Net fine-tunes) or batch "
                        "(the paper's U-Net, 3.3; does not transfer to nnU-Net's instance norm, see the transfer "
                        "check) [%(default)s]")
    setting("restoration_target", choices=["standardised", "absolute"],
            text="what the U-Net's output restores: 'standardised', the clean cube standardised by its own mean and "
                 "standard deviation (what an instance-normalised network can know; errors reported in the window's "
                 "units); 'absolute', the clean cube itself through Models Genesis' sigmoid (linear with --intensity "
                 "nnunet) [%(default)s]")
    setting("intensity", choices=["unit", "nnunet"],
            text="cube intensities: 'unit', each source's window scaled to [0, 1] (Models Genesis); 'nnunet', "
                 "transformed in that window, then normalised as nnU-Net normalises the target (CT with the "
                 "target's CT parameters, MRI z-scored over its non-zero voxels) [%(default)s]")
    setting("seed", "[%(default)s]")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="[%(default)s]")
    p.add_argument("-num_gpus", type=_at_least(1), default=1,
                   help="DDP processes on this node, as nnUNetv2_train's -num_gpus (with -device cpu: gloo processes); "
                        "or start with torchrun [%(default)s]")
    p.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from checkpoint_latest.pth of this run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same output folder")
    return p


def add_objective_options(p: argparse.ArgumentParser):
    """Every objective's own settings (its ``Settings`` dataclass) as ``--<objective>-<option>``."""
    from nnunet_sar.pretraining.objectives import available, objective_class
    from nnunet_sar.pretraining.objectives.base import options_of
    for name in available():
        options = options_of(objective_class(name))
        if not options:
            continue
        group = p.add_argument_group(f"options of --objective {name}")
        for key, (default, text) in options.items():
            kind = type(default) if isinstance(default, (int, float, str)) and not isinstance(default, bool) else str
            group.add_argument(f"--{name}-{key.replace('_', '-')}", dest=f"objopt:{name}:{key}", type=kind, metavar=key.upper(),
                               default=None, help=f"{text} [{default}]".replace("%", "%%"))


def objective_options(args: argparse.Namespace) -> dict:
    """The options given for the chosen objective; an option of another objective is an error."""
    out = {}
    for dest, value in vars(args).items():
        if dest.startswith("objopt:") and value is not None:
            _, name, key = dest.split(":")
            if name != args.objective:
                raise SystemExit(f"nnunet_sar_pretrain: error: --{name}-{key.replace('_', '-')} is an option of "
                                 f"--objective {name}, not of {args.objective}")
            out[key] = value
    return out


COUNTS_SUFFIX = re.compile(r"^(.+):(\d+),(\d+),(\d+)$")


def split_cube_counts(sources: list) -> tuple[list, dict]:
    """``SRC[:CT|:MRI][:L,M,S]`` items -> (the sources without counts, {source: [L, M, S]})."""
    plain, counts = [], {}
    for spec in sources:
        m = COUNTS_SUFFIX.match(spec)
        if m:
            spec = m.group(1)
            counts[spec] = [int(c) for c in m.groups()[1:]]
        plain.append(spec)
    return plain, counts


def given_options(argv) -> set:
    """The destinations of the options on the command line (a preset fills in only the others)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def apply_preset(args: argparse.Namespace, given: set) -> dict:
    """Sets the preset's values on ``args``, but not over options given explicitly; returns those it set."""
    from nnunet_sar.pretraining.settings import PAPER_PRESET
    args.cubes_per_source = {}
    if args.preset != "paper":
        return {}
    replaced_by = {"cubes_per_source": "cubes_per_volume"}  # --cubes-per-volume replaces Table 1's counts
    applied = {k: copy.deepcopy(v) for k, v in PAPER_PRESET.items() if replaced_by.get(k, k) not in given}
    vars(args).update(applied)
    return applied


def settings_from_args(argv=None):
    """(PretrainSettings, parsed arguments) of a command line, preset applied."""
    from nnunet_sar.pretraining.settings import ADAM_LRS, PretrainSettings
    args = build_parser().parse_args(argv)
    given = given_options(argv)
    preset_values = apply_preset(args, given)
    if args.optimizer == "adam":  # Adam's own learning rates where none was given (the preset's are SGD's)
        vars(args).update({k: v for k, v in ADAM_LRS.items() if k not in given})
        preset_values = {k: v for k, v in preset_values.items() if k not in ADAM_LRS}
    args.sources, own_counts = split_cube_counts(args.sources)
    workers = args.num_workers
    if workers is None:
        workers = os.environ.get("nnUNet_n_proc_DA", "4" if args.device == "cuda" else "0")
        try:
            workers = _at_least(0)(workers)
        except argparse.ArgumentTypeError as e:
            build_parser().error(f"environment variable nnUNet_n_proc_DA={workers!r}: {e}")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainSettings) if hasattr(args, f.name)}
    settings = PretrainSettings(**{
        **values, "num_workers": workers, "cubes_per_source": {**args.cubes_per_source, **own_counts},
        "preset_values": preset_values, "objective_options": objective_options(args),
        "corruptions": {**PretrainSettings(dataset="", sources=[]).corruptions, **dict(args.corruption)}})
    return settings, args


def main(argv=None):
    settings, args = settings_from_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("nnunet_sar_pretrain: error: -device cuda but no CUDA device is available (use -device cpu)")
    if args.num_gpus > 1:
        import torch.multiprocessing as mp
        from nnunetv2.run.run_training import find_free_network_port
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ.setdefault("MASTER_PORT", str(find_free_network_port()))
        try:
            mp.spawn(_run, args=(args.num_gpus, settings, args.continue_training, args.overwrite), nprocs=args.num_gpus)
        except mp.ProcessExitedException:
            sys.exit(1)  # the rank that failed has said why
    else:
        world = int(os.environ.get("WORLD_SIZE", 1))  # > 1 when started by torchrun
        _run(int(os.environ.get("RANK", 0)), world, settings, args.continue_training, args.overwrite)


def _run(rank: int, world_size: int, settings, continue_training: bool, overwrite: bool):
    """One process of a (possibly distributed) pre-training run. The ranks tear the process group down together,
    after a barrier, so that none exits while rank 0 still writes the checkpoint and runs the transfer check (a
    two-process gloo run once ended there in "terminate called without an active exception"; the cause is not
    proven). A rank that fails just exits: mp.spawn or torchrun then ends the others (a teardown there could wait
    forever on ranks blocked in a collective)."""
    import torch.distributed as dist
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun --nproc_per_node 1 runs DDP too
        dist.init_process_group("nccl" if settings.device == "cuda" else "gloo", rank=rank, world_size=world_size)
    console_main("nnunet_sar_pretrain")(_train)(settings, continue_training, overwrite)  # errors: one line
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _train(settings, continue_training: bool, overwrite: bool):
    from nnunet_sar.pretraining.loop import SARPretrainer
    trainer = SARPretrainer(settings)
    trainer.initialize(continue_training=continue_training, overwrite=overwrite)
    trainer.run_training()


if __name__ == "__main__":
    main()
