"""``nnunet_sar_benchmark --transfer``: does the pre-trained start help nnU-Net? Measured end to end.

Phantom targets (evidence about the pipeline, not about real tumours):
- ``demo``: the demo's own target (bright MRI blob; 10 labelled cases, fold 0 trains on 8; 4 test cases);
- ``faint``: a tumour with 40 % of the demo's contrast and voxel-wise heterogeneity 0.25 (at a quarter of
  the contrast nnU-Net from scratch learned nothing in the demo's 30 iterations: pseudo Dice 0.04, 0.05,
  0.04): 5 labelled cases, fold 0 trains on 4; 6 test cases;
- ``bright``: the same few-label set-up with the demo's full contrast and the same texture.
- ``texture``: the same few-label set-up with no contrast at all, the tumour differs by its texture (0.25)
  alone: the one target measured so far where an untrained encoder does not already separate the tumour
  (linear probe, average precision 0.25-0.42 against 0.90-0.94 on ``faint``; BENCHMARKS.md, "Why the
  benchmark's targets show no head start"), so the one where pre-training has room to help; at the demo's
  30 iterations no arm learns it in two pairs of three, so it needs a longer schedule to compare (at 100,
  ``--finetune-epochs 10``, scratch reaches 0.47-0.69).
Each repeat pre-trains with the demo's settings (3 x 10 steps of 8 cubes of 32^3, otherwise
``nnunet_sar_pretrain``'s defaults; sources: the demo's CT and MRI phantoms) once per pre-training arm (``sar_checkpoint``:
the ``--checkpoint`` given, in every repeat), then fine-tunes every arm with the demo's schedule
(3 epochs x 10 iterations, or ``--finetune-epochs`` N x 10; fold 0; ``nnUNet_SAR_seed`` = 2000 + repeat for every arm, so that the arms of a
repeat share their initialisation, batches and augmentations and differ only in the arm: paired differences)
through ``nnUNetv2_train`` (``nnUNet_SAR_checkpoint`` hands the one
checkpoint to every target: their plans build the same network), predicts the test cases with nnU-Net's
predictor and scores Dice. Reported: test Dice mean +- sd over repeats, and nnU-Net's pseudo Dice after
the first epoch (10 iterations), where a stalled start shows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from os.path import isfile, join

from nnunet_sar import SARError, console_main
from nnunet_sar.commands.demo import PRETRAINING, SOURCES, _exe  # the demo's pre-training, sources, script lookup
from nnunet_sar.commands.report import mean_std
from nnunet_sar.files import atomic_write_json

# arm: (fine-tuning trainer, pre-training run it starts from or None)
ARMS = {
    "scratch": ("nnUNetTrainer_demo", None),
    "genesis": ("nnUNetTrainerGenesis_demo", "genesis_instance"),
    "sar": ("nnUNetTrainerSAR_demo", "sar_instance"),  # the default: encoder only, linear warm-up
    "sar_noWarmup": ("nnUNetTrainerSAR_noWarmup_demo", "sar_instance"),
    "sar_fullTransfer": ("nnUNetTrainerSAR_fullTransfer_demo", "sar_instance"),
    "sar_sawtooth": ("nnUNetTrainerSAR_sawtooth_demo", "sar_instance"),
    "sar_fullTransfer_noWarmup": ("nnUNetTrainerSAR_fullTransfer_noWarmup_demo", "sar_instance"),
    "sar_batchnorm": ("nnUNetTrainerSAR_demo", "sar_batch"),  # the default path, batch-norm pre-training
    "sar_batchnorm_fullTransfer_noWarmup": ("nnUNetTrainerSAR_fullTransfer_noWarmup_demo", "sar_batch"),  # before
    "sar_lr0.1": ("nnUNetTrainerSAR_demo", "sar_lr0.1"),  # the demo's U-Net lr before it became 0.01
    "sar_lr1": ("nnUNetTrainerSAR_demo", "sar_lr1"),  # the paper's U-Net lr (and Models Genesis')
    "sar_lr1_noPaint": ("nnUNetTrainerSAR_demo", "sar_lr1_noPaint"),  # lr 1 without in- and out-painting
    "genesis_lr1": ("nnUNetTrainerGenesis_demo", "genesis_lr1"),  # restoration alone (no S, no M) at lr 1
    "sar_momentum0.99": ("nnUNetTrainerSAR_demo", "sar_momentum0.99"),
    "sar_nnunetIntensity": ("nnUNetTrainerSAR_demo", "sar_nnunet"),
    "sar_absolute": ("nnUNetTrainerSAR_demo", "sar_absolute"),  # Models Genesis' absolute restoration target
    "sar_lr0": ("nnUNetTrainerSAR_demo", "sar_lr0"),  # control: warm-up and a fresh encoder, nothing pre-trained
    "sar_lr0_noWarmup": ("nnUNetTrainerSAR_noWarmup_demo", "sar_lr0"),  # the control less its warm-up: the encoder
    # draw alone against scratch
    "scratch_otherDraw": ("nnUNetTrainerSAR_noWarmup_demo", "fresh_draw"),  # scratch with its encoder drawn by
    # nnU-Net's own initialisation at another seed (3000 + repeat): what the lr-0 control is, without pre-training
    "sar_300steps": ("nnUNetTrainerSAR_demo", "sar_300steps"),  # ten times the demo's pre-training
    "sar_adam": ("nnUNetTrainerSAR_demo", "sar_adam"),  # pre-trained with Adam at its default rates
    "sar_noInvert": ("nnUNetTrainerSAR_demo", "sar_noInvert"),  # no cube turned upside down by the non-linear map
    "sar_checkpoint": ("nnUNetTrainerSAR_demo", "checkpoint"),  # --checkpoint FILE in every repeat (a longer run)
}
# pre-training run: (variant, options after the demo's own); the last option of a kind wins
PRETRAININGS = {"sar_instance": ("sar", ["--norm", "instance"]), "sar_batch": ("sar", ["--norm", "batch"]),
                "genesis_instance": ("genesis", ["--norm", "instance"]),
                "sar_lr0.1": ("sar", ["--lr-unet", "0.1"]), "sar_lr1": ("sar", ["--lr-unet", "1"]),
                "sar_lr1_noPaint": ("sar", ["--lr-unet", "1", "--corruption", "paint_p=0"]),
                "genesis_lr1": ("genesis", ["--lr-unet", "1"]), "sar_momentum0.99": ("sar", ["--momentum", "0.99"]),
                "sar_nnunet": ("sar", ["--intensity", "nnunet"]),
                "sar_absolute": ("sar", ["--restoration-target", "absolute"]),
                "sar_lr0": ("sar", ["--lr-unet", "0"]),  # control: the U-Net as initialised, nothing learned
                "sar_300steps": ("sar", ["--epochs", "30"]), "sar_adam": ("sar", ["--optimizer", "adam"]),
                "sar_noInvert": ("sar", ["--corruption", "invert_p=0"])}
TARGETS = {  # name: (id, num_training, num_test, contrast, texture, seed)
    "demo": (901, 10, 4, 1.0, 0.0, 1),
    "faint": (913, 5, 6, 0.4, 0.25, 21),
    "bright": (912, 5, 6, 1.0, 0.25, 22),
    "texture": (914, 5, 6, 0.0, 0.25, 23),
}


def _run(cmd: list, env: dict, log_file: str) -> None:
    with open(log_file, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}); see {log_file}")


def prepare(root: str, targets: list[str], env: dict, log_file: str) -> dict:
    from nnunet_sar.phantoms import write_phantom_dataset
    raw = env["nnUNet_raw"]
    for sid, sname, modality in SOURCES:  # as nnunet_sar_demo
        if not os.path.isdir(join(raw, f"Dataset{sid:03d}_{sname}")):
            write_phantom_dataset(raw, sid, sname, modality, num_training=6, shape=(32, 48, 48),
                                  spacing=(1.5, 1.0, 1.0), seed=100 + sid)
    names = {}
    for t in targets:
        tid, n_tr, n_ts, contrast, texture, seed = TARGETS[t]
        name = f"SARBench{t.capitalize()}" if t != "demo" else "SARPhantomTumorMRI"
        names[t] = f"Dataset{tid:03d}_{name}"
        if not isfile(join(env["nnUNet_preprocessed"], names[t], "nnUNetPlans.json")):
            write_phantom_dataset(raw, tid, name, "MRI", num_training=n_tr, num_test=n_ts, shape=(48, 48, 48),
                                  seed=seed, tumor_contrast=contrast, tumor_texture=texture, overwrite=True)
            _run([_exe("nnUNetv2_plan_and_preprocess"), "-d", str(tid), "-c", "3d_fullres", "-np", "2", "-npfp", "2"],
                 {**env, "nnUNet_n_proc_DA": "1"}, log_file)
    return names


def pretrain(first_target: str, key: str, repeat: int, env: dict, log_file: str, device: str = "cpu") -> str:
    """One pre-training run as the demo makes it; returns a copy of its checkpoint (with its transfer check)."""
    keep = join(env["nnUNet_results"], "pretrained", f"{key}_r{repeat}")
    if isfile(join(keep, "checkpoint_final.pth")):  # a rerun in the same folder re-uses it
        return join(keep, "checkpoint_final.pth")
    if key == "fresh_draw":
        return fresh_draw(first_target, 3000 + repeat, keep)
    variant, options = PRETRAININGS[key]
    tid = first_target.split("_")[0][len("Dataset"):]
    _run([_exe("nnunet_sar_pretrain"), "-d", tid, "--sources", *[str(s[0]) for s in SOURCES], "--variant", variant,
          "--epochs", "3", *PRETRAINING, *options, "--seed", str(1000 + repeat), "-device", device, "--overwrite"],
         env, log_file)
    from nnunet_sar.checkpoint import pretrain_output_folder
    folder = pretrain_output_folder(first_target, variant, "nnUNetPlans", "3d_fullres")
    os.makedirs(keep, exist_ok=True)
    for f in ("checkpoint_final.pth", "transfer_check.json"):
        os.replace(join(folder, f), join(keep, f))
    return join(keep, "checkpoint_final.pth")


def fresh_draw(target: str, seed: int, keep: str) -> str:
    """A checkpoint of nnU-Net's own initialisation of `target`'s network, drawn after ``torch.manual_seed(seed)``:
    nothing pre-trained and no pre-training code, so that scratch against this arm measures the encoder's draw
    alone (the fine-tuning path is the same to the last bit: test_seeded_demo_trainer_repeats_exactly)."""
    import torch
    from nnunet_sar.checkpoint import atomic_save, cpu_state_dict
    from nnunet_sar.network import build_target_network, load_plans
    torch.manual_seed(seed)
    network = build_target_network(*load_plans(target, "nnUNetPlans", "3d_fullres"))
    os.makedirs(keep, exist_ok=True)
    atomic_save({"network_weights": cpu_state_dict(network)}, join(keep, "checkpoint_final.pth"))
    return join(keep, "checkpoint_final.pth")


def finetune_and_score(target: str, trainer: str, checkpoint: str | None, env: dict, log_file: str,
                       seed: int | None = None, device: str = "cpu", epochs: int = 3) -> dict:
    """nnUNetv2_train fold 0 (seeded with ``nnUNet_SAR_seed``: every arm of a repeat gets the same initialisation,
    batches and augmentations; ``epochs`` of 10 iterations through ``nnUNet_SAR_demo_epochs``), then Dice of
    nnU-Net's predictions on the target's test cases."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    tid = target.split("_")[0][len("Dataset"):]
    run_env = {**env, "nnUNet_n_proc_DA": "0"}
    run_env.pop("nnUNet_SAR_checkpoint", None)
    run_env.pop("nnUNet_SAR_seed", None)
    run_env["nnUNet_SAR_demo_epochs"] = str(epochs)
    if seed is not None:
        run_env["nnUNet_SAR_seed"] = str(seed)
    if checkpoint:
        run_env["nnUNet_SAR_checkpoint"] = checkpoint
    _run([_exe("nnUNetv2_train"), tid, "3d_fullres", "0", "-tr", trainer, "-device", device], run_env, log_file)
    model = join(env["nnUNet_results"], target, f"{trainer}__nnUNetPlans__3d_fullres")
    log = torch.load(join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)["logging"]
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model, (0,), "checkpoint_final.pth")
    raw = join(env["nnUNet_raw"], target)
    pred = join(model, "test_predictions")
    predictor.predict_from_files(join(raw, "imagesTs"), pred, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    dice = []
    for f in sorted(os.listdir(join(raw, "labelsTs"))):
        gt = sitk.GetArrayFromImage(sitk.ReadImage(join(raw, "labelsTs", f))) > 0
        pr = sitk.GetArrayFromImage(sitk.ReadImage(join(pred, f))) > 0
        dice.append(2 * float((gt & pr).sum()) / max(1.0, float(gt.sum() + pr.sum())))
    return {"test_dice": float(np.mean(dice)), "test_dice_per_case": dice, "finetune_seed": seed,
            "pseudo_dice_per_epoch": [float(d) for d in log["mean_fg_dice"]],
            "train_loss_per_epoch": [float(x) for x in log["train_losses"]]}


def _load_results(fname: str) -> dict:
    if not isfile(fname):
        return {}
    try:
        with open(fname) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SARError(f"cannot read the results of earlier repeats in {fname} ({e}); move it away to start again "
                       f"in this folder") from None


def _save_results(results: dict, fname: str) -> None:
    """Atomically, after every arm: a kill mid-write keeps the previous complete file, so a rerun continues."""
    atomic_write_json(fname, results, indent=1)


def table(results: dict, arms: list, targets: list) -> str:
    lines = ["| arm | " + " | ".join(f"{t}: test Dice | {t}: pseudo Dice, epoch 1" for t in targets) + " |",
             "|---|" + "---|---|" * len(targets)]
    for arm in arms:
        cells = []
        for t in targets:
            runs = results.get(t, {}).get(arm, [])
            if not runs:
                cells += ["", ""]
                continue
            d, e1 = mean_std([r["test_dice"] for r in runs]), mean_std([r["pseudo_dice_per_epoch"][0] for r in runs])
            cells += [f"{d[0]:.3f} +- {d[1]:.3f} (n={len(runs)})", f"{e1[0]:.2f} +- {e1[1]:.2f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(prog="nnunet_sar_benchmark --transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="[all]")
    p.add_argument("--targets", nargs="+", default=["demo", "faint"], choices=list(TARGETS), help="[demo faint]")
    p.add_argument("--repeats", type=int, default=3, help="[%(default)s]")
    p.add_argument("--checkpoint", default=None,
                   help="the sar_checkpoint arm's pre-training checkpoint (e.g. a run far longer than the demo's, made "
                        "elsewhere with the demo's target plans): every repeat fine-tunes it with that repeat's seed")
    p.add_argument("-o", "--output", default=None, help="working folder [a new temporary folder]")
    p.add_argument("--json", default=None, help="write all results here (also written into the working folder)")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda"],
                   help="pre-training, fine-tuning and prediction [%(default)s]; nnUNet_n_proc_DA=0 keeps a repeat's "
                        "batches the same in every arm")
    p.add_argument("--finetune-epochs", type=int, default=3,
                   help="fine-tuning epochs of 10 iterations for every arm [%(default)s: the demo's schedule]; longer "
                        "runs let a target that 30 iterations cannot learn (texture) show a head start")
    return p


@console_main("nnunet_sar_benchmark --transfer")
def main(argv=None):
    args = build_parser().parse_args(argv)
    root = os.path.abspath(args.output or tempfile.mkdtemp(prefix="nnunet_sar_transfer_benchmark_"))
    log_file = join(root, "benchmark_log.txt")
    out_json = join(root, "transfer_benchmark.json")
    results = _load_results(out_json)  # a rerun in the same folder continues
    if args.finetune_epochs < 1:
        raise SARError(f"--finetune-epochs {args.finetune_epochs}: expected >= 1")
    # a new folder takes the flag's length; one written before the flag has the demo's 3
    if results.setdefault("finetune_epochs", args.finetune_epochs if not results else 3) != args.finetune_epochs:
        raise SARError(f"{out_json} holds runs of {results['finetune_epochs']} fine-tuning epochs; give another -o "
                       f"for --finetune-epochs {args.finetune_epochs}")
    needed = sorted({ARMS[a][1] for a in args.arms if ARMS[a][1]})
    if "checkpoint" in needed:
        if not args.checkpoint or not isfile(args.checkpoint):
            raise SARError(f"the arm sar_checkpoint needs --checkpoint FILE (got {args.checkpoint!r})")
        given = results.setdefault("checkpoint", os.path.abspath(args.checkpoint))
        if given != os.path.abspath(args.checkpoint):
            raise SARError(f"{out_json} holds sar_checkpoint rows of {given}; give another -o for {args.checkpoint}")
    env = dict(os.environ)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[k] = os.environ[k] = join(root, k)
        os.makedirs(env[k], exist_ok=True)
    env.update({"nnUNet_compile": "0", "nnUNet_def_n_proc": env.get("nnUNet_def_n_proc", "2")})
    t0 = time.time()
    print(f"transfer benchmark in {root} (log: {log_file}); fine-tuning {args.finetune_epochs} x 10 iterations",
          flush=True)
    names = prepare(root, args.targets, env, log_file)
    for r in range(args.repeats):
        if all(len(results.get(t, {}).get(a, [])) > r for t in args.targets for a in args.arms):
            continue
        ckpts = {key: pretrain(names[args.targets[0]], key, r, env, log_file, args.device) for key in needed if key != "checkpoint"}
        if "checkpoint" in needed:  # the given run, in every repeat
            ckpts["checkpoint"] = results["checkpoint"]
        checks = {key: join(os.path.dirname(c), "transfer_check.json") for key, c in ckpts.items()}
        checks = {key: json.load(open(f)) for key, f in checks.items() if isfile(f)}
        results.setdefault("transfer_checks", {}).setdefault(str(r), {}).update(checks)
        for t in args.targets:
            for arm in args.arms:
                done = results.setdefault(t, {}).setdefault(arm, [])
                if len(done) > r:
                    continue
                trainer, key = ARMS[arm]
                res = finetune_and_score(names[t], trainer, ckpts.get(key), env, log_file, seed=2000 + r,
                                         device=args.device, epochs=args.finetune_epochs)
                done.append(res)
                print(f"[{time.time() - t0:6.0f} s] repeat {r + 1}/{args.repeats} {t:6s} {arm:24s} test Dice "
                      f"{res['test_dice']:.3f}  pseudo Dice per epoch "
                      f"{' '.join(f'{d:.2f}' for d in res['pseudo_dice_per_epoch'])}", flush=True)
                _save_results(results, out_json)
    text = table(results, args.arms, args.targets)
    print("\n" + text)
    print(f"\ndone in {time.time() - t0:.0f} s; phantom targets: evidence about the pipeline, not about tumours")
    if args.json:
        _save_results(results, args.json)


if __name__ == "__main__":
    main()
