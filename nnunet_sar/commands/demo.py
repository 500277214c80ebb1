"""``nnunet_sar_demo``: the whole SAR workflow on synthetic phantoms, with nnU-Net's own commands.

phantoms -> nnUNetv2_plan_and_preprocess -> nnunet_sar_pretrain -> nnUNetv2_train -tr nnUNetTrainerSAR_demo
(and the from-scratch nnUNetTrainer_demo) -> nnUNetv2_predict -> nnUNetv2_evaluate_folder -> Dice.
Everything happens in a fresh folder with its own nnUNet_raw / nnUNet_preprocessed / nnUNet_results;
the user's nnU-Net folders are used only with --use-nnunet-env.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from os.path import join

TARGET = (901, "SARPhantomTumorMRI")
SOURCES = ((902, "SARPhantomCT", "CT"), (903, "SARPhantomMRI", "MRI"))


def _run(cmd: list[str], env: dict, step: str):
    print(f"\n=== {step}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    start = time.time()
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        sys.exit(f"nnunet_sar_demo: '{cmd[0]}' failed with exit code {done.returncode}")
    print(f"=== {step}: {time.time() - start:.0f} s", flush=True)


def _exe(name: str) -> str:
    """A console script of this environment (next to the running interpreter), else from PATH."""
    candidate = join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


# The demo's brief pre-training (after --epochs), otherwise nnunet_sar_pretrain's defaults: small cubes in
# batches of 8. The transfer benchmark pre-trains the same way.
PRETRAINING = ["--iters-per-epoch", "10", "--patch-size", "32", "32", "32", "--batch-size", "8"]


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="nnunet_sar_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default=None, help="folder for everything the demo makes [a new temporary folder]")
    p.add_argument("--use-nnunet-env", action="store_true",
                   help="use the nnUNet_raw/nnUNet_preprocessed/nnUNet_results already set instead of -o")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda"], help="[%(default)s]")
    p.add_argument("--pretrain-epochs", type=int, default=3, help="[%(default)s]")
    p.add_argument("--no-baseline", action="store_true", help="skip the from-scratch nnUNetTrainer_demo run")
    p.add_argument("--overwrite", action="store_true", help="recreate the phantom datasets and runs if they exist")
    p.add_argument("--tiny", action="store_true",
                   help="the smallest run of every step (32^3 phantoms, 5 + 2 target cases, 1 pre-training epoch of "
                        "2 iterations, nnUNetTrainerSAR_check: 1 epoch of 2 iterations, no baseline), for "
                        "nnunet_sar_benchmark --gpu-check -device cpu; its Dice means nothing")
    args = p.parse_args(argv)
    if args.tiny:
        args.pretrain_epochs, args.no_baseline = 1, True

    from nnunet_sar.phantoms import write_phantom_dataset

    env = dict(os.environ)
    if args.use_nnunet_env:
        missing = [k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not env.get(k)]
        if missing:
            sys.exit(f"nnunet_sar_demo: error: --use-nnunet-env but {', '.join(missing)} not set")
        root = env["nnUNet_results"]
    else:
        root = os.path.abspath(args.output) if args.output else tempfile.mkdtemp(prefix="nnunet_sar_demo_")
        if args.output and os.path.isdir(root) and os.listdir(root) and not args.overwrite:
            sys.exit(f"nnunet_sar_demo: error: {root} is not empty; choose another -o or pass --overwrite")
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env[k] = join(root, k)
            os.makedirs(env[k], exist_ok=True)
    env.setdefault("nnUNet_def_n_proc", "2")
    if args.device == "cpu":
        env["nnUNet_compile"] = "0"
    train_env = {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "0" if args.device == "cpu" else "4")}
    raw = env["nnUNet_raw"]
    t0 = time.time()

    print(f"=== [1/6] phantoms in {raw}", flush=True)
    tid, tname = TARGET
    side, n_train, n_test, n_source = (32, 5, 2, 3) if args.tiny else (48, 10, 4, 6)
    target = write_phantom_dataset(raw, tid, tname, "MRI", num_training=n_train, num_test=n_test, shape=(side,) * 3,
                                   seed=1, overwrite=args.overwrite)
    for sid, sname, modality in SOURCES:  # anisotropic sources: pre-training resamples them to 1 mm
        write_phantom_dataset(raw, sid, sname, modality, num_training=n_source, shape=(2 * side // 3, side, side),
                              spacing=(1.5, 1.0, 1.0), seed=100 + sid, overwrite=args.overwrite)
    dataset = f"Dataset{tid:03d}_{tname}"
    dev = ["-device", args.device]
    plan_env = {**env, "nnUNet_n_proc_DA": str(max(1, int(env.get("nnUNet_n_proc_DA") or 1)))}  # the planner crashes with 0
    _run([_exe("nnUNetv2_plan_and_preprocess"), "-d", str(tid), "-c", "3d_fullres", "--verify_dataset_integrity",
          "-np", "2", "-npfp", "2"], plan_env, "[2/6] nnU-Net planning and preprocessing of the target")
    _run([_exe("nnunet_sar_pretrain"), "-d", str(tid), "--sources", *[str(s[0]) for s in SOURCES],
          "--epochs", str(args.pretrain_epochs), *dev, *PRETRAINING,
          *(["--iters-per-epoch", "2", "--batch-size", "4"] if args.tiny else [])] +  # the last of an option wins
         (["--overwrite"] if args.overwrite else []), train_env, "[3/6] SAR pre-training (brief)")
    trainers = ["nnUNetTrainerSAR_check" if args.tiny else "nnUNetTrainerSAR_demo"] + (
        [] if args.no_baseline else ["nnUNetTrainer_demo"])
    for tr in trainers:
        _run([_exe("nnUNetv2_train"), str(tid), "3d_fullres", "0", "-tr", tr, *dev], train_env,
             f"[4/6] nnU-Net fine-tuning, fold 0: {tr}")
    dice = {}
    for tr in trainers:
        pred = join(env["nnUNet_results"], dataset, f"{tr}__nnUNetPlans__3d_fullres", "test_predictions")
        _run([_exe("nnUNetv2_predict"), "-i", join(target, "imagesTs"), "-o", pred, "-d", str(tid), "-c", "3d_fullres",
              "-f", "0", "-tr", tr, "--disable_tta", *dev,  # no mirroring: 8x fewer passes, the demo's time budget
              "-npp", "0", "-nps", "0"],  # nnU-Net's sequential mode: 4 small cases need no worker processes
             env, f"[5/6] nnU-Net inference on the test cases: {tr}")
        _run([_exe("nnUNetv2_evaluate_folder"), join(target, "labelsTs"), pred, "-djfile", join(target, "dataset.json"),
              "-pfile", join(env["nnUNet_preprocessed"], dataset, "nnUNetPlans.json")], env,
             f"[6/6] nnU-Net evaluation: {tr}")
        with open(join(pred, "summary.json")) as f:
            dice[tr] = (json.load(f)["foreground_mean"]["Dice"], join(pred, "summary.json"))

    ckpt = join(env["nnUNet_results"], dataset, "nnUNetSARPretrain_sar__nnUNetPlans__3d_fullres")
    print(f"\n=== done in {time.time() - t0:.0f} s. Test-set Dice (tumor) after a few CPU iterations:")
    for tr, (d, summary) in dice.items():
        print(f"  {tr:24s} {d:.4f}   ({summary})")
    check = join(ckpt, "transfer_check.json")
    if os.path.isfile(check):
        with open(check) as f:
            r = json.load(f)
        print(f"transfer check (restoration MSE, held-out cubes): pre-training net {r['pretraining_network']:.4f}, "
              f"nnU-Net's net {r['finetuning_network']:.4f}, corrupted input {r['corrupted_input']:.4f}, cube mean "
              f"{r['cube_mean']:.4f}: {r['verdict']}")
    print(f"SAR pre-training run:   {ckpt}  (checkpoint_final.pth, transfer_check.png, progress.png, training_log_*.txt)")
    print(f"fine-tuning runs:       {join(env['nnUNet_results'], dataset)}/<trainer>__nnUNetPlans__3d_fullres/fold_0")
    print(f"phantom datasets:       {raw}")
    print("These numbers come from seconds of training on a CPU; they show the pipeline works, not how well SAR does.")


if __name__ == "__main__":
    main()
