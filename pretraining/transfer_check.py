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
(b) should be close to (a) and clearly below (c) and (d). With Models Genesis' corruptions the check also
reports (b) and (d) apart on the voxels painting replaced and on those the input still shows, and on the
shown voxels of cubes the non-linear map inverted and of the others (``regions``): where the error sits.
Written to ``transfer_check.json`` and ``transfer_check.png`` (mid-slices: clean, corrupted, restored by
(a) and by (b)) beside the checkpoint.
``nnunet_sar_check_transfer`` runs it on demand for a finished run.

Objectives that restore (sar, genesis, mae) are measured so; ``mae`` on its masked voxels (``loss_mask``),
the voxels its loss reads. Objectives that train the encoder alone (rot, rpl, jigsaw, cpc) hand on no
restoration: for them the check compares (a) and (b) where fine-tuning starts: the bottleneck features of
the pre-training network's encoder and of nnU-Net's (relative max difference) and the proxy-task accuracy
through each encoder with the objective's head, against chance.
"""
import argparse
import dataclasses
import os
import warnings
from os.path import dirname, join

import numpy as np
import torch

from nnunet_sar import SARError, console_main, nnunet_folder
from nnunet_sar.checkpoint import find_pretrained_checkpoint, load_checkpoint_file
from nnunet_sar.files import atomic_write, atomic_write_json
from nnunet_sar.network import build_network, build_pretraining_network, dataset_name, load_plans
from nnunet_sar.pretraining.intensity import SCHEMES, intensity_maps, normalise_as_nnunet
from nnunet_sar.pretraining.objectives import objective_class
from nnunet_sar.pretraining.settings import PretrainSettings

TOLERANCE = 1.1  # (b) may be at most 10 % worse than (a)


def verdict(r: dict) -> str:
    a, b, c, d = (r[k] for k in ("pretraining_network", "finetuning_network", "corrupted_input", "cube_mean"))
    if c > 0 and b > c:  # c == 0: corruptions off, nothing beats returning the input
        return (f"WARNING: the fine-tuning network restores WORSE than returning the corrupted input ({b:.4g} > {c:.4g}): "
                f"nnU-Net will not start from what pre-training learned"
                + (" (norm 'batch'; try --norm instance)" if r["norm"] == "batch" else ""))
    if b > TOLERANCE * a:
        return f"WARNING: the fine-tuning network is {b / a:.2f}x worse than the pre-training network (> {TOLERANCE})"
    if b >= d:
        return (f"ok: fine-tuning network within {TOLERANCE}x of the pre-training network and below the corrupted "
                f"input, but not below each cube's mean ({b:.4g} >= {d:.4g}): pre-training has learned little yet")
    return (f"ok: fine-tuning network within {TOLERANCE}x of the pre-training network and below the corrupted input "
            f"and each cube's mean")


def _norm_name(net: torch.nn.Module) -> str:
    norms = {type(m).__name__ for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)}
    return "+".join(sorted(norms)) or "none"


@torch.no_grad()
def _restore(net: torch.nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int, device,
             restoration) -> torch.Tensor:
    out = [restoration(net(images[i:i + batch_size].to(device)).cpu(), target[i:i + batch_size])
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def objective_of(settings: dict):
    """The objective of a run, rebuilt from its recorded settings (as the loop built it)."""
    known = {f.name for f in dataclasses.fields(PretrainSettings)}
    ps = PretrainSettings(**{"restoration_target": "absolute",  # runs from before the option: a sigmoid output
                             **{k: v for k, v in settings.items() if k in known}})
    ps.objective = settings.get("objective", "sar")
    obj = objective_class(ps.objective)(ps, settings["patch_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run warned already
        obj.setup(settings["modalities"], settings["batch_size"])
    return obj


def check_transfer(checkpoint_file: str, val_batch: dict, batch_size: int, device="cpu", out_folder: str | None = None,
                   log=print, objective=None, intensity: str | None = None) -> dict:
    """Runs the check for a pre-training checkpoint on `val_batch` (the loop's fixed validation cubes);
    writes the json and png into `out_folder` (default: beside the checkpoint). ``intensity``: measure on
    the cubes in this scheme instead of the run's own (a ``unit`` run on the intensities nnU-Net will show
    it: ``nnunet``); written as ``transfer_check_<scheme>.*`` so the run's own check stays."""
    ckpt = load_checkpoint_file(checkpoint_file)
    s = ckpt.get("settings") or {}
    own = s.get("intensity", "unit")
    scheme = intensity or own
    objective = objective or objective_of({**s, "intensity": scheme})  # errors in the window's units either way
    if scheme != "unit":  # the cubes as the loop's _step sees them (the maps came from validation_cubes_of)
        val_batch = normalise_as_nnunet(val_batch)
    stem = "transfer_check" if scheme == own else f"transfer_check_{scheme}"
    if not objective.restores:
        return check_encoder_transfer(ckpt, checkpoint_file, objective, val_batch, batch_size, device, out_folder, log,
                                      stem)
    pm, cm, _ = load_plans(s["dataset_name"], s["plans_identifier"], s["configuration"])
    weights = ckpt["network_weights"]
    pre = build_pretraining_network(pm, cm, 1, norm=s.get("norm", "batch"))
    pre.load_state_dict({**weights, **ckpt.get("norm_statistics", {})})
    pre.to(device).train(s.get("norm") == "batch")  # as SARPretrainer.validate: batch statistics for batch norm
    fine = build_network(pm, cm, 1, 1, deep_supervision=False)
    fine.load_state_dict(weights)  # strict: the fine-tuning network has exactly these keys
    fine.to(device).eval()
    images, target = val_batch["image"].float(), val_batch["target"].float()
    restored_pre = _restore(pre, images, target, batch_size, device, objective.restoration)
    restored_fine = _restore(fine, images, target, batch_size, device, objective.restoration)
    mean = target.flatten(1).mean(1).view(-1, *[1] * (target.ndim - 1)).expand_as(target)
    mse = lambda x: float(objective.restoration_error(x, target, val_batch.get("intensity"),  # noqa: E731
                                                      val_batch.get("loss_mask")))  # mae: its masked voxels
    r = {"pretraining_network": mse(restored_pre), "finetuning_network": mse(restored_fine),
         "corrupted_input": mse(images), "cube_mean": mse(mean), "cubes": len(images), "norm": s.get("norm"),
         "checkpoint": os.path.abspath(checkpoint_file), "network_class": cm.network_arch_class_name,
         "pretraining_norm_op": _norm_name(pre), "finetuning_norm_op": _norm_name(fine), "kind": "restoration",
         "objective": objective.name, "voxels": "masked" if "loss_mask" in val_batch else "all",
         "intensity": scheme, "pretraining_intensity": own}
    r["ratio_finetuning_to_pretraining"] = r["finetuning_network"] / max(r["pretraining_network"], 1e-12)
    r["verdict"] = verdict(r)
    if "painted" in val_batch and "loss_mask" not in val_batch:
        r["regions"] = regions(val_batch, lambda x, m: float(objective.restoration_error(
            x, target, val_batch.get("intensity"), m)), restored_fine, mean)
    where = "; ".join(f"{k} voxels ({v['share']:.0%}) {v['finetuning_network']:.4g} against {v['cube_mean']:.4g}"
                      for k, v in r.get("regions", {}).items())
    r["summary"] = (f"restoration MSE on held-out cubes ({r['voxels']} voxels), pre-training network "
                    f"{r['pretraining_network']:.4g}, this (fine-tuning) network {r['finetuning_network']:.4g}, corrupted "
                    f"input {r['corrupted_input']:.4g}, cube mean {r['cube_mean']:.4g}: {r['verdict']}"
                    + (f". Where the error sits, (b) against (d): {where}" if where else ""))
    _write(out_folder or dirname(os.path.abspath(checkpoint_file)), r,
           lambda f: _picture(f, images, target, restored_pre, restored_fine, r), stem)
    log(f"transfer check{'' if scheme == own else f' on cubes in the {scheme!r} intensities (pre-trained on {own!r})'}"
        f": restoration MSE on {len(images)} held-out cubes: (a) pre-training network "
        f"{r['pretraining_network']:.4g}, (b) fine-tuning network ({r['finetuning_norm_op']}) "
        f"{r['finetuning_network']:.4g}, (c) corrupted input {r['corrupted_input']:.4g}, (d) cube mean "
        f"{r['cube_mean']:.4g}. {r['verdict']}"
        + (f"\n(b) against (d) where the error sits: {where}" if where else ""))
    return r


def regions(val_batch: dict, error, restored, mean) -> dict:
    """(b) and (d) on the voxels the input still shows and on those painting replaced, and on the shown
    voxels of cubes the non-linear map inverted and of the others: the cube mean (d) is an oracle there too,
    and a short run restores what it can see before it learns to invent the painted voxels or to tell an
    inverted cube's polarity. ``error(x, mask)``: the objective's error on ``mask``'s voxels."""
    painted = val_batch["painted"].bool()
    shown = ~painted
    out = {"shown": shown, "painted": painted}
    if "inverted" in val_batch:
        inverted = val_batch["inverted"].bool().view(-1, *[1] * (painted.ndim - 1))
        out.update({"shown, not inverted": shown & ~inverted, "shown, inverted": shown & inverted})
    return {k: {"share": float(m.float().mean()), "finetuning_network": error(restored, m), "cube_mean": error(mean, m)}
            for k, m in out.items() if m.any()}


FEATURE_TOLERANCE = 1e-3  # relative max difference of the encoders' bottleneck features
ACCURACY_TOLERANCE = 0.02  # (b)'s proxy accuracy may be this much below (a)'s


@torch.no_grad()
def check_encoder_transfer(ckpt: dict, checkpoint_file: str, objective, val_batch: dict, batch_size: int, device,
                           out_folder, log, stem: str = "transfer_check") -> dict:
    """For an objective that trains the encoder alone: nnU-Net's network, with the checkpoint's weights, has
    the pre-training network's encoder features, and the proxy task read through its encoder (with the
    objective's head) scores as in pre-training, above chance."""
    s = ckpt["settings"]
    pm, cm, _ = load_plans(s["dataset_name"], s["plans_identifier"], s["configuration"])
    weights = ckpt["network_weights"]
    pre_unet = build_pretraining_network(pm, cm, 1, norm=s.get("norm", "batch"))
    pre_unet.load_state_dict({**weights, **ckpt.get("norm_statistics", {})})
    fine_unet = build_network(pm, cm, 1, 1, deep_supervision=False)
    fine_unet.load_state_dict(weights)  # strict: the fine-tuning network has exactly these keys
    nets = {}
    for name, unet in (("pre", pre_unet), ("fine", fine_unet)):
        net = objective.build_network(unet)
        for head in ckpt.get("heads", []):
            getattr(net, head).load_state_dict(ckpt[head])
        net.to(device)
        net.eval() if name == "fine" else net.train(s.get("norm") == "batch")
        nets[name] = net
    n = len(val_batch["image"])
    sums = {"pre": {}, "fine": {}}
    diff, scale = 0.0, 0.0
    for i in range(0, n, batch_size):
        chunk = {k: v[i:i + batch_size].to(device) for k, v in val_batch.items()}
        m = len(chunk["image"])
        for name, net in nets.items():
            for k, v in objective.terms(net, chunk).items():
                sums[name][k] = sums[name].get(k, 0.0) + m * float(v)
        x = chunk["image"].float()
        x = x.flatten(0, x.ndim - 5) if x.ndim > 5 else x
        a, b = pre_unet.encoder(x)[-1], fine_unet.encoder(x)[-1]
        diff, scale = max(diff, float((a - b).abs().max())), max(scale, float(a.abs().max()))
    metric = objective.proxy_metric
    acc = {name: sums[name][metric] / n for name in nets}
    r = {"kind": "encoder", "objective": objective.name, "proxy_metric": metric, "chance": objective.chance,
         "pretraining_network": acc["pre"], "finetuning_network": acc["fine"],
         "pretraining_loss": sums["pre"]["scheduled"] / n, "finetuning_loss": sums["fine"]["scheduled"] / n,
         "encoder_feature_difference": diff / max(scale, 1e-12), "cubes": n, "norm": s.get("norm"),
         "checkpoint": os.path.abspath(checkpoint_file), "network_class": cm.network_arch_class_name,
         "pretraining_norm_op": _norm_name(pre_unet), "finetuning_norm_op": _norm_name(fine_unet)}
    if r["encoder_feature_difference"] > FEATURE_TOLERANCE:
        r["verdict"] = (f"WARNING: nnU-Net's encoder computes other features than the pre-training encoder (relative "
                        f"difference {r['encoder_feature_difference']:.3g} > {FEATURE_TOLERANCE}; norm {r['norm']!r}; "
                        f"try --norm instance)")
    elif acc["fine"] < acc["pre"] - ACCURACY_TOLERANCE:
        r["verdict"] = f"WARNING: the proxy task scores lower through nnU-Net's encoder ({acc['fine']:.3f} < {acc['pre']:.3f})"
    else:
        r["verdict"] = "ok: nnU-Net's encoder computes the pre-training encoder's features"
    r["summary"] = (f"{metric} on {n} held-out cubes through the pre-training encoder {acc['pre']:.3f}, through this "
                    f"(fine-tuning) network's encoder {acc['fine']:.3f} (chance {objective.chance:.3g}), encoder features "
                    f"differ by {r['encoder_feature_difference']:.2g} (relative): {r['verdict']}")
    _write(out_folder or dirname(os.path.abspath(checkpoint_file)), r, lambda f: _bars(f, r), stem)
    log(f"transfer check ({objective.name}, encoder only): {r['summary']}")
    return r


def _write(folder: str, r: dict, picture, stem: str = "transfer_check") -> None:
    """``stem``.json and ``stem``.png (``picture(file)``) into ``folder``, each written atomically."""
    atomic_write_json(join(folder, f"{stem}.json"), r, indent=2)
    atomic_write(join(folder, f"{stem}.png"), picture)


def _bars(fname, r):
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(["(a) pre-training encoder", "(b) nnU-Net's encoder", "chance"],
           [r["pretraining_network"], r["finetuning_network"], r["chance"]], color=["C0", "C1", "grey"])
    ax.set_ylabel(r["proxy_metric"]), ax.set_ylim(0, 1)
    ax.set_title(f"transfer check '{r['objective']}': encoder features differ by {r['encoder_feature_difference']:.2g}",
                 fontsize=9)
    plt.tight_layout()
    fig.savefig(fname, format="png")  # a file object from atomic_write
    plt.close(fig)


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
    fig.savefig(fname, format="png")  # a file object from atomic_write
    plt.close(fig)


def validation_cubes_of(settings: dict) -> dict:
    """The run's fixed validation cubes, rebuilt from its settings exactly as ``SARPretrainer`` built them."""
    from nnunet_sar.pretraining.corruptions import marking
    from nnunet_sar.pretraining.cubes import fixed_validation_cubes
    from nnunet_sar.pretraining.sources import preprocess_sources, split_train_val
    cache = settings.get("cache_dir") or join(nnunet_folder("nnUNet_preprocessed"), "nnUNetSAR_sources")
    volumes = preprocess_sources(settings["sources"], cache, num_processes=1, progress=False)
    _, val_volumes = split_train_val(volumes, settings["val_fraction"], settings["seed"])
    per_volume = [c if i in settings["scales"] else 0 for i, c in enumerate(settings["val_cubes_per_volume"])]
    pm, cm, _ = load_plans(settings["dataset_name"], settings["plans_identifier"], settings["configuration"])
    maps = dict(zip((v.path for v in volumes), intensity_maps(volumes, settings.get("intensity", "unit"), pm, cm)))
    return fixed_validation_cubes(val_volumes, settings.get("cube_size", settings["patch_size"]), per_volume,
                                  marking(objective_of(settings).transforms()), seed=settings["seed"] + 1,
                                  modalities=settings["modalities"], intensity_maps=[maps[v.path] for v in val_volumes])


def main(argv=None):
    p = argparse.ArgumentParser(prog="nnunet_sar_check_transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="target dataset name or id")
    p.add_argument("-p", dest="plans_identifier", default="nnUNetPlans", help="[%(default)s]")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="[%(default)s]")
    p.add_argument("--objective", default="sar", help="pre-training objective [%(default)s]")
    p.add_argument("--variant", default=None, help="SAR's pre-training variant [sar]")
    p.add_argument("--checkpoint", default=None, help="another checkpoint file [the run's checkpoint_final.pth]")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"], help="[%(default)s]")
    p.add_argument("--intensity", default=None, choices=SCHEMES,
                   help="measure on the held-out cubes in this intensity scheme (nnunet: as nnU-Net normalises the "
                        "target) instead of the run's own; written as transfer_check_<scheme>.json/png [the run's]")
    args = p.parse_args(argv)
    console_main("nnunet_sar_check_transfer")(check_run)(args)


def check_run(args):
    run = args.variant or args.objective
    fname = args.checkpoint or find_pretrained_checkpoint(dataset_name(args.dataset), run, args.plans_identifier,
                                                          args.configuration)
    settings = load_checkpoint_file(fname).get("settings")
    if not settings:
        raise SARError(f"{fname} has no 'settings': not a checkpoint of nnunet_sar_pretrain")
    cubes = validation_cubes_of({**settings, "intensity": args.intensity or settings.get("intensity", "unit")})
    return check_transfer(fname, cubes, settings["batch_size"], args.device, intensity=args.intensity)


if __name__ == "__main__":
    main()
