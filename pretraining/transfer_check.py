"""The transfer check: does the network nnU-Net will fine-tune do what the pre-trained network did?

Keys and shapes can match while the function does not (batch norm while pre-training, nnU-Net's
instance norm while fine-tuning). So every pre-training run ends by measuring the function, on its own
fixed held-out validation cubes, as restoration MSE of
  (a) the pre-training network, as validation runs it;
  (b) the fine-tuning network: built exactly as nnU-Net's trainer builds it (the plans' norm, nnU-Net's
      ``build_network_architecture``) with one output, loaded with ``network_weights`` including the
      restoration layer, in eval mode as nnU-Net predicts;
  (c) returning the corrupted input unchanged;
  (d) predicting each clean cube's own mean (the best constant; an oracle, so a hard floor to beat).
(b) should be close to (a) and clearly below (c) and (d). Written to ``transfer_check.json`` and
``transfer_check.png`` (mid-slices: clean, corrupted, restored by (a) and by (b)) beside the checkpoint.
``nnunet_sar_check_transfer`` runs it on demand for a finished run.
"""
import argparse
import json
import os
import sys
from os.path import dirname, join

import numpy as np
import torch

from nnunet_sar import SARError, one_line
from nnunet_sar.checkpoint import find_pretrained_checkpoint, load_checkpoint_file
from nnunet_sar.network import build_network, build_pretraining_network, dataset_name, load_plans
from nnunet_sar.pretraining.intensity import apply_intensity_map, intensity_maps
from nnunet_sar.pretraining.objective import SARObjective

TOLERANCE = 1.1  # (b) may be at most 10 % worse than (a)


def verdict(r: dict) -> str:
    a, b, c, d = (r[k] for k in ("pretraining_network", "finetuning_network", "corrupted_input", "cube_mean"))
    if c > 0 and b > c:  # c == 0: corruptions off, nothing beats returning the input
        return (f"WARNING: the fine-tuning network restores WORSE than returning the corrupted input ({b:.4g} > {c:.4g}): "
                f"nnU-Net will not start from what pre-training learned (norm {r['norm']!r}; try --norm instance)")
    if b > TOLERANCE * a:
        return f"WARNING: the fine-tuning network is {b / a:.2f}x worse than the pre-training network (> {TOLERANCE})"
    return f"ok: fine-tuning network within {TOLERANCE}x of the pre-training network and below the corrupted input"


def _norm_name(net: torch.nn.Module) -> str:
    norms = {type(m).__name__ for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)}
    return "+".join(sorted(norms)) or "none"


@torch.no_grad()
def _restore(net: torch.nn.Module, images: torch.Tensor, batch_size: int, device, activation) -> torch.Tensor:
    out = [activation(net(images[i:i + batch_size].to(device))).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def check_transfer(checkpoint_file: str, val_batch: dict, batch_size: int, device="cpu", out_folder: str | None = None,
                   log=print) -> dict:
    """Runs the check for a SAR checkpoint on `val_batch` (``image``/``target``, as the loop's fixed
    validation cubes); writes the json and png into `out_folder` (default: beside the checkpoint)."""
    ckpt = load_checkpoint_file(checkpoint_file)
    s = ckpt.get("settings") or {}
    pm, cm, _ = load_plans(s["dataset_name"], s["plans_identifier"], s["configuration"])
    weights = ckpt["network_weights"]
    pre = build_pretraining_network(pm, cm, 1, norm=s.get("norm", "batch"))
    pre.load_state_dict({**weights, **ckpt.get("norm_statistics", {})})
    pre.to(device).train(s.get("norm") == "batch")  # as SARPretrainer.validate: batch statistics for batch norm
    fine = build_network(pm, cm, 1, 1, deep_supervision=False)
    fine.load_state_dict(weights)  # strict: the fine-tuning network has exactly these keys
    fine.to(device).eval()
    objective = SARObjective(intensity=s.get("intensity", "unit"))  # its restoration output and error
    maps = val_batch.get("intensity")
    images, target = val_batch["image"].float(), val_batch["target"].float()
    if maps is not None:  # the cubes as the loop's _step sees them (nnU-Net's normalisation, if chosen)
        images, target = apply_intensity_map(images, maps), apply_intensity_map(target, maps)
    restored_pre = _restore(pre, images, batch_size, device, objective.restoration)
    restored_fine = _restore(fine, images, batch_size, device, objective.restoration)
    mean = target.flatten(1).mean(1).view(-1, *[1] * (target.ndim - 1)).expand_as(target)
    mse = lambda x: float(objective.restoration_error(x, target, maps))  # noqa: E731
    r = {"pretraining_network": mse(restored_pre), "finetuning_network": mse(restored_fine),
         "corrupted_input": mse(images), "cube_mean": mse(mean), "cubes": len(images), "norm": s.get("norm"),
         "checkpoint": os.path.abspath(checkpoint_file), "network_class": cm.network_arch_class_name,
         "pretraining_norm_op": _norm_name(pre), "finetuning_norm_op": _norm_name(fine)}
    r["ratio_finetuning_to_pretraining"] = r["finetuning_network"] / max(r["pretraining_network"], 1e-12)
    r["verdict"] = verdict(r)
    out_folder = out_folder or dirname(os.path.abspath(checkpoint_file))
    with open(join(out_folder, "transfer_check.json"), "w") as f:
        json.dump(r, f, indent=2)
    _picture(join(out_folder, "transfer_check.png"), images, target, restored_pre, restored_fine, r)
    log(f"transfer check: restoration MSE on {len(images)} held-out cubes: (a) pre-training network "
        f"{r['pretraining_network']:.4g}, (b) fine-tuning network ({r['finetuning_norm_op']}) "
        f"{r['finetuning_network']:.4g}, (c) corrupted input {r['corrupted_input']:.4g}, (d) cube mean "
        f"{r['cube_mean']:.4g}. {r['verdict']}")
    return r


def _picture(fname, images, target, pre, fine, r, n: int = 4):
    """Mid-slices (first axis) of `n` cubes spread over the set: clean, corrupted, (a), (b)."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    idx = np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int)
    cols = (("clean", target), ("corrupted (input)", images), ("restored: pre-training net (a)", pre),
            ("restored: fine-tuning net (b)", fine))
    fig, axes = plt.subplots(len(idx), 4, figsize=(12, 3 * len(idx)), squeeze=False)
    for row, i in enumerate(idx):
        for col, (title, x) in enumerate(cols):
            ax = axes[row, col]
            lo, hi = float(target[i].min()), float(target[i].max())  # the clean cube's range, any intensity scheme
            ax.imshow(x[i, 0, x.shape[2] // 2].numpy(), cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=10)
    fig.suptitle(f"transfer check, MSE: (a) {r['pretraining_network']:.4g}  (b) {r['finetuning_network']:.4g}  "
                 f"(c) {r['corrupted_input']:.4g}  (d) {r['cube_mean']:.4g}", fontsize=11)
    plt.tight_layout()
    fig.savefig(fname)
    plt.close(fig)


def validation_cubes_of(settings: dict) -> dict:
    """The run's fixed validation cubes, rebuilt from its settings exactly as ``SARPretrainer`` built them."""
    from nnunet_sar.pretraining.corruptions import genesis_corruptions
    from nnunet_sar.pretraining.cubes import fixed_validation_cubes
    from nnunet_sar.pretraining.sources import preprocess_sources, split_train_val
    cache = settings.get("cache_dir") or join(os.environ.get("nnUNet_preprocessed", "."), "nnUNetSAR_sources")
    volumes = preprocess_sources(settings["sources"], cache, num_processes=1, progress=False)
    _, val_volumes = split_train_val(volumes, settings["val_fraction"], settings["seed"])
    per_volume = [c if i in settings["scales"] else 0 for i, c in enumerate(settings["val_cubes_per_volume"])]
    pm, cm, _ = load_plans(settings["dataset_name"], settings["plans_identifier"], settings["configuration"])
    maps = dict(zip((v.path for v in volumes), intensity_maps(volumes, settings.get("intensity", "unit"), pm, cm)))
    return fixed_validation_cubes(val_volumes, settings["patch_size"], per_volume,
                                  genesis_corruptions(**settings["corruptions"]), seed=settings["seed"] + 1,
                                  modalities=settings["modalities"], intensity_maps=[maps[v.path] for v in val_volumes])


def main(argv=None):
    p = argparse.ArgumentParser(prog="nnunet_sar_check_transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="target dataset name or id")
    p.add_argument("-p", dest="plans_identifier", default="nnUNetPlans", help="[%(default)s]")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="[%(default)s]")
    p.add_argument("--variant", default="sar", help="pre-training variant [%(default)s]")
    p.add_argument("--checkpoint", default=None, help="another checkpoint file [the run's checkpoint_final.pth]")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"], help="[%(default)s]")
    args = p.parse_args(argv)
    try:
        fname = args.checkpoint or find_pretrained_checkpoint(dataset_name(args.dataset), args.variant,
                                                              args.plans_identifier, args.configuration)
        settings = load_checkpoint_file(fname).get("settings")
        if not settings:
            raise SARError(f"{fname} has no 'settings': not a checkpoint of nnunet_sar_pretrain")
        check_transfer(fname, validation_cubes_of(settings), settings["batch_size"], args.device)
    except SARError as e:
        print("nnunet_sar_check_transfer: error: " + one_line(e), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
