"""``nnunet_sar_benchmark --gpu-check -device cuda|cpu``: one prepared run of every accelerator path.

Every real use of this project runs on a GPU, and every test runs on the CPU. This check runs the paths that
only an accelerator takes, in one command, and writes a JSON and a short text table that names each path with
``pass``, ``fail`` or ``skipped (needs CUDA)`` and its measured figures:

1. ``demo``: ``nnunet_sar_demo -device D`` end to end (pre-training, ``nnUNetTrainerSAR_demo``, predict, evaluate).
2. ``pretrain_steps``: ``SARPretrainer._step`` under ``--transform-on device`` (clean cubes from the loader, the
   corruptions run on the device inside ``_step`` with the loader's per-cube seeds), AMP autocast and the CUDA
   gradient scaler: losses finite, the scale sane, the weights moved.
3. ``checkpoint_cpu_only``: that run's checkpoint read in a fresh process with ``CUDA_VISIBLE_DEVICES=""`` by
   nnU-Net's own ``load_pretrained_weights`` (``torch.load`` without map_location), by a plain ``torch.load`` and
   by nnunet_sar's loader.
4. ``resume``: 2 epochs in one go against 1 epoch + ``--continue`` (``initialize(continue_training=True)``) for
   1 more, deterministic algorithms on: weights, heads, optimizer state and logged losses compared bit for bit.
5. ``corruption_statistics``: the device path (``cubes.transform_batch``) on device tensors against the per-cube
   CPU path (as the Dataset corrupts): each corruption's rate against its probability and against the other path
   within binomial bounds (4 sigma), value ranges, flips applied to input and target alike.
6. ``ddp``: ``torchrun --nproc_per_node 1`` (NCCL on CUDA, gloo on the CPU) against ``-num_gpus 1`` (no process
   group, as nnUNetv2_train -num_gpus 1): one epoch each through the console script, weights compared.
7. ``throughput``: SAR pre-training steps/s and cubes/s (the loop's ``_step``, corruptions included) at the
   paper's cube and at the plan's patch, for several batch sizes, AMP on and off; the loader's cubes/s at
   several worker counts (bottleneck: the smaller of loader and step); peak GPU memory; nnU-Net's own
   ``nnUNetTrainer.train_step`` at the same plan, and the ratio SAR step / nnU-Net step.
8. ``finetune_overhead``: ``nnUNetTrainerSAR`` against ``nnUNetTrainer`` per epoch (train_step medians on the
   same batches x the trainer's iterations per epoch; initialize() once).

``-device cuda`` runs at the issue's sizes (under 8 minutes on one GPU is the aim). ``-device cpu`` runs the
same code at tiny sizes (a minute or two): what needs CUDA itself (autocast in float16, the CUDA gradient
scaler, NCCL, peak GPU memory) is reported ``skipped (needs CUDA)``, and the code around it runs on CPU
tensors in its place (``torch.amp.GradScaler('cpu')`` through ``_step``'s scaler branch, gloo for the process
group); the device path of the corruptions runs on CPU tensors as on CUDA ones.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from os.path import isfile, join

import numpy as np
import torch

from nnunet_sar.commands.demo import _exe  # the console scripts of this environment

NEEDS_CUDA = "skipped (needs CUDA)"
DEMO_ID = 901  # nnunet_sar_demo's target; its sources are 902 (CT) and 903 (MRI)
NNUNET_ITERATIONS_PER_EPOCH = 250  # nnUNetTrainer.num_iterations_per_epoch (both trainers keep it)
FULLRES_ID = 831  # CUDA only: a phantom target planned by nnU-Net at a full-resolution patch

# what each form runs; cpu: tiny sizes, cuda: the sizes
SIZES = {
    "cpu": {"steps": 3, "step_batch": 4, "step_patch": [32, 32, 32], "resume_iters": 2, "resume_batch": 2,
            "stat_samples": 200, "stat_cube": [24, 24, 24], "paper_cube": [16, 32, 32], "batches": [2, 4],
            "workers": [0, 2], "warmup": 1, "timed": 3, "loader_batches": 4, "finetune_iterations": 3},
    "cuda": {"steps": 20, "step_batch": 16, "step_patch": [32, 64, 64], "resume_iters": 5, "resume_batch": 8,
             "stat_samples": 400, "stat_cube": [32, 64, 64], "paper_cube": [32, 64, 64], "batches": [8, 16, 32],
             "workers": [0, 4, 8], "warmup": 2, "timed": 8, "loader_batches": 12, "finetune_iterations": 8,
             "fullres_shape": [160, 160, 160], "fullres_cases": 5},  # nnU-Net splits 5 folds: >= 5 cases
}


class Report:
    """The paths with their status and figures, in the order they ran."""

    def __init__(self, device: str):
        self.device, self.entries = device, []

    def add(self, path: str, status: str, detail: str = "", **figures):
        assert status in ("pass", "fail", NEEDS_CUDA), status
        self.entries.append({"path": path, "status": status, "detail": detail, "figures": figures})
        print(f"[gpu-check] {path}: {status}" + (f" ({detail})" if detail else ""), flush=True)

    def check(self, path: str, ok: bool, detail: str = "", **figures):
        self.add(path, "pass" if ok else "fail", detail, **figures)

    def needs_cuda(self, path: str, detail: str):
        self.add(path, NEEDS_CUDA, detail)

    def guard(self, path: str):
        """A context that records an exception as a failure of ``path`` and goes on with the next path."""
        report = self

        class _Guard(contextlib.AbstractContextManager):
            def __exit__(self, exc_type, exc, tb):
                if exc is not None and not isinstance(exc, KeyboardInterrupt):
                    report.add(path, "fail", f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}",
                               traceback="".join(traceback.format_exception(exc_type, exc, tb))[-3000:])
                    return True
                return False
        return _Guard()


def _sh(cmd, env=None, timeout=900) -> subprocess.CompletedProcess:
    # cwd: the work folder, never a source checkout (whose nnunet_sar/ lacks the pretraining/ that setup.py maps in)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env or os.environ, timeout=timeout,
                          cwd=os.environ["nnUNet_results"])
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}: {done.stderr[-1500:] or done.stdout[-1500:]}")
    return done


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _plans_copy(dataset: str, name: str, patch=None, batch_size=None) -> str:
    """A copy of the dataset's nnUNetPlans under another identifier (so a run gets its own output folder)."""
    from nnunet_sar.network import preprocessed_folder
    folder = preprocessed_folder(dataset)
    plans = json.load(open(join(folder, "nnUNetPlans.json")))
    plans["plans_name"] = name
    if patch is not None:
        plans["configurations"]["3d_fullres"]["patch_size"] = list(patch)
    if batch_size is not None:
        plans["configurations"]["3d_fullres"]["batch_size"] = int(batch_size)
    json.dump(plans, open(join(folder, f"{name}.json"), "w"), indent=1)
    return name


def _settings(device, plans, **kw):
    from nnunet_sar.pretraining.settings import PretrainSettings
    base = dict(dataset=str(DEMO_ID), sources=["902", "903"], plans_identifier=plans, epochs=1, iters_per_epoch=2,
                batch_size=2, patch_size=[32, 32, 32], lr_unet=0.1, num_workers=0, device=device,
                val_cubes_per_volume=[1, 1, 1], transform_on="device")  # the accelerator's path, on any device
    return PretrainSettings(**{**base, **kw})


def _trainer(settings, quiet=True, **init):
    from nnunet_sar.pretraining.loop import SARPretrainer
    tr = SARPretrainer(settings)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small-batch advice for M: tiny batches are on purpose here
        tr.initialize(overwrite=True, **init)
    return tr


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in module.parameters()])


# ----------------------------------------------------------------------------------------------
# 1. demo
# ----------------------------------------------------------------------------------------------
def check_demo(rep: Report, device: str):
    cmd = [_exe("nnunet_sar_demo"), "-device", device, "--use-nnunet-env", "--overwrite"]
    if device == "cpu":
        cmd.append("--tiny")
    t = time.time()
    with rep.guard("demo"):
        done = _sh(cmd, timeout=1200)
        dice = {}
        for line in done.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0].startswith("nnUNetTrainer") and "summary.json" in line:
                dice[words[0]] = float(words[1])
        ckpt = join(os.environ["nnUNet_results"], "Dataset901_SARPhantomTumorMRI",
                    "nnUNetSARPretrain_sar__nnUNetPlans__3d_fullres", "checkpoint_final.pth")
        ok = isfile(ckpt) and bool(dice) and all(math.isfinite(v) for v in dice.values())
        rep.check("demo", ok, " ".join(cmd[1:]) + ("; the tiny form: its Dice means nothing" if device == "cpu" else ""),
                  seconds=round(time.time() - t, 1), test_dice=dice, checkpoint=isfile(ckpt))


# ----------------------------------------------------------------------------------------------
# 2. + 3. pre-training steps (AMP, scaler, corruptions on the device), checkpoint on a CPU-only process
# ----------------------------------------------------------------------------------------------
def check_pretrain_steps(rep: Report, device: str, sz: dict, root: str) -> str | None:
    tr = _trainer(_settings(device, _plans_copy(str(DEMO_ID), "nnUNetPlans_gpucheckSteps"),
                            iters_per_epoch=sz["steps"], batch_size=sz["step_batch"], patch_size=sz["step_patch"]))
    cuda = tr.device.type == "cuda"
    if not cuda:  # the CPU stand-in for the CUDA scaler: _step's scaler branch (scale, unscale_, clip, step, update)
        tr.grad_scaler = torch.amp.GradScaler("cpu")
    before = _flat(tr.sar_network)
    losses, scales, seconds = [], [], []
    for batch, seeds in tr.batches():  # --transform-on device: clean cubes, seeds for _step
        _sync(device)
        t = time.perf_counter()
        terms = tr._step(batch, train=True, seeds=seeds)
        _sync(device)
        seconds.append(time.perf_counter() - t)
        losses.append(terms["total"])
        scales.append(float(tr.grad_scaler.get_scale()))
    moved = float((_flat(tr.sar_network) - before).abs().max())
    finite = all(math.isfinite(v) for v in losses)
    sane = all(math.isfinite(s) and 1.0 <= s <= 2.0 ** 24 for s in scales)
    fig = dict(steps=len(losses), batch=tr.batch_size, patch=tr.patch_size, total_loss=[round(v, 5) for v in losses],
               grad_scale=scales, max_weight_change=moved, median_step_s=float(np.median(seconds)))
    rep.check("pretrain_steps.corruptions_on_device_in_step", finite and moved > 0,
              f"--transform-on device: the corruptions ran inside _step on {device} batches", **fig)
    if cuda:
        rep.check("pretrain_steps.amp_autocast_fp16", finite, "losses finite under autocast", total_loss=fig["total_loss"])
        rep.check("pretrain_steps.grad_scaler_cuda", sane and moved > 0,
                  "scale within [1, 2^24], weights moved", grad_scale=scales, scale_range=[min(scales), max(scales)])
    else:
        rep.needs_cuda("pretrain_steps.amp_autocast_fp16", "_step enables autocast on CUDA only")
        rep.needs_cuda("pretrain_steps.grad_scaler_cuda", "the loop makes its GradScaler on CUDA only")
        rep.check("pretrain_steps.grad_scaler_branch_cpu", sane and moved > 0,
                  "torch.amp.GradScaler('cpu') through _step's scaler branch: scale within [1, 2^24], weights moved",
                  grad_scale=scales, scale_range=[min(scales), max(scales)])
    ckpt = join(root, "gpu_check_steps.pth")
    tr.save_checkpoint(ckpt)
    return ckpt


CPU_ONLY_CHILD = r"""
import json, sys, torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunet_sar.checkpoint import load_checkpoint_file
from nnunet_sar.network import build_target_network, load_plans
fname, dataset, plans = sys.argv[1:4]
out = {"cuda_available": torch.cuda.is_available()}
raw = torch.load(fname, weights_only=False)  # as nnU-Net's load_pretrained_weights: no map_location
devices = set()
def walk(o):
    if isinstance(o, torch.Tensor): devices.add(str(o.device))
    elif isinstance(o, dict): [walk(v) for v in o.values()]
    elif isinstance(o, (list, tuple)): [walk(v) for v in o]
walk(raw)
out["tensor_devices"] = sorted(devices)
pm, cm, dj = load_plans(dataset, plans)
net = build_target_network(pm, cm, dj)
load_pretrained_weights(net, fname, verbose=False)
ours = load_checkpoint_file(fname)
sd = net.state_dict()
out["loaded_equal"] = all(torch.equal(sd[k], v) for k, v in ours["network_weights"].items()
                          if k in sd and ".seg_layers." not in k)
out["n_weights"] = len(ours["network_weights"])
print("CHILD " + json.dumps(out))
"""


def check_cpu_only_load(rep: Report, ckpt: str):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = _sh([sys.executable, "-c", CPU_ONLY_CHILD, ckpt, str(DEMO_ID), "nnUNetPlans_gpucheckSteps"], env=env)
    out = json.loads(done.stdout.split("CHILD ", 1)[1])
    ok = (not out["cuda_available"]) and out["tensor_devices"] == ["cpu"] and out["loaded_equal"]
    rep.check("checkpoint_cpu_only", ok, "CUDA_VISIBLE_DEVICES='': nnU-Net's load_pretrained_weights, torch.load "
              "without map_location, nnunet_sar's loader", **out)


# ----------------------------------------------------------------------------------------------
# 4. --continue resumes bit-identically
# ----------------------------------------------------------------------------------------------
def _compare_states(a: dict, b: dict, prefix="") -> list[str]:
    """Every tensor or number that differs between two nested states, with its largest difference."""
    diffs = []
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k), b.get(k)
        name = f"{prefix}{k}"
        if isinstance(x, dict) and isinstance(y, dict):
            diffs += _compare_states(x, y, name + ".")
        elif isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.equal(x, y):
                d = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else "shape"
                diffs.append(f"{name} (max |diff| {d})")
        elif x != y and not (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            diffs.append(f"{name} ({x!r} vs {y!r})")
    return diffs


def check_resume(rep: Report, device: str, sz: dict):
    from nnunet_sar.checkpoint import load_checkpoint_file
    if device == "cuda":
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        kw = dict(epochs=2, iters_per_epoch=sz["resume_iters"], batch_size=sz["resume_batch"],
                  num_workers=2 if device == "cuda" else 0)
        plans = _plans_copy(str(DEMO_ID), "nnUNetPlans_gpucheckResume")
        quiet = contextlib.redirect_stdout(io.StringIO())
        with quiet:
            whole = _trainer(_settings(device, plans, **kw))
            whole.run_training()
        a_folder = whole.output_folder + "_whole"
        shutil.rmtree(a_folder, ignore_errors=True)
        os.rename(whole.output_folder, a_folder)
        with contextlib.redirect_stdout(io.StringIO()):
            first = _trainer(_settings(device, plans, **{**kw, "epochs": 1}))
            first.run_training()
            resumed = _trainer(_settings(device, plans, **kw), continue_training=True)
            resumed.run_training()
        a = load_checkpoint_file(join(a_folder, "checkpoint_final.pth"))
        b = load_checkpoint_file(join(resumed.output_folder, "checkpoint_final.pth"))
        keys = ("network_weights", "norm_statistics", "scale_head", "discriminator", "optimizer_state",
                "lr_scheduler_state", "grad_scaler_state", "current_epoch", "best_val_loss")
        diffs = _compare_states({k: a.get(k) for k in keys}, {k: b.get(k) for k in keys})
        log_a, log_b = a["logging"], b["logging"]
        for k in sorted(log_a):
            if "timestamp" not in k and log_a[k] != log_b.get(k):
                diffs.append(f"logging.{k} ({log_a[k]} vs {log_b.get(k)})")
        rep.check("resume_bit_identical", not diffs,
                  "2 epochs in one run vs 1 epoch + --continue (initialize(continue_training=True)) for 1 more, "
                  "deterministic algorithms" + ("" if not diffs else "; differs: " + "; ".join(diffs[:8])),
                  differing=diffs, val_loss=log_a["val_loss"], epochs=2, iterations_per_epoch=kw["iters_per_epoch"],
                  batch=kw["batch_size"], workers=kw["num_workers"])
    finally:
        torch.use_deterministic_algorithms(False)


# ----------------------------------------------------------------------------------------------
# 5. corruption statistics: device vs CPU
# ----------------------------------------------------------------------------------------------
def _distinct_cube(shape, seed) -> torch.Tensor:
    """(1, *shape) with all values distinct, in [0, 1): every corruption's effect is visible."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return (torch.randperm(n, generator=g).float() / n).view(1, *shape)


FLIP_COMBOS = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def _flip_axes(clean, target):
    for axes in FLIP_COMBOS:
        if torch.equal(torch.flip(clean, [a + 1 for a in axes]) if axes else clean, target):
            return axes
    return None


def _toggle(w, ndim):
    out = [0.0] * (ndim + 1)
    for j, pj in enumerate(w):
        if j < ndim:
            out[j + 1] += pj * (ndim - j) / ndim
        if j > 0:
            out[j - 1] += pj * j / ndim
    return out


def net_flip_rate(p: float = 0.4, max_flips: int = 3, ndim: int = 3) -> float:
    """P(the flips do not cancel out): k attempts (each succeeding with p, stopping at the first failure, at
    most ``max_flips``), each toggling one of ``ndim`` axes uniformly; a random walk on the number of flipped axes."""
    w, total = [1.0] + [0.0] * ndim, 0.0
    for k in range(max_flips + 1):
        pk = p ** k * ((1 - p) if k < max_flips else 1.0)
        total += pk * (1.0 - w[0])
        w = _toggle(w, ndim)
    return total


def observe(kind: str, clean: torch.Tensor, image: torch.Tensor, target: torch.Tensor) -> dict:
    """What one corrupted cube shows of the transform ``kind`` (the only one switched on), on the CPU."""
    image, target = image.detach().float().cpu(), target.detach().float().cpu()
    changed = not torch.equal(image, clean)
    o = {"min": float(image.min()), "max": float(image.max()), "target_clean": torch.equal(target, clean)}
    if kind == "flip":
        o.update(flipped=_flip_axes(clean, target) not in ((), None), alike=torch.equal(image, target),
                 recognised=_flip_axes(clean, target) is not None)
    elif kind == "shuffle":
        o.update(applied=changed, permutation=torch.equal(image.flatten().sort()[0], clean.flatten().sort()[0]))
    elif kind == "nonlinear":
        c = torch.corrcoef(torch.stack([clean.flatten(), image.flatten()]))[0, 1].item() if changed else 1.0
        o.update(applied=changed, inverted=changed and c < 0)
    elif kind == "paint":
        diff = image != clean
        o.update(applied=changed, outpaint=changed and bool(diff[(0,) + (0,) * (clean.ndim - 1)]),
                 noise_sum=float(image[diff].double().sum()), noise_n=int(diff.sum()))
    return o


STAT_PIPELINES = {  # one transform switched on, Models Genesis' rate
    "flip": dict(flip_p=0.4, shuffle_p=0, nonlinear_p=0, paint_p=0),
    "shuffle": dict(flip_p=0, shuffle_p=0.5, nonlinear_p=0, paint_p=0),
    "nonlinear": dict(flip_p=0, shuffle_p=0, nonlinear_p=0.9, paint_p=0),
    "paint": dict(flip_p=0, shuffle_p=0, nonlinear_p=0, paint_p=0.9, inpaint_share=0.2),
}


def corruption_samples(kind: str, device: str, n: int, cube_shape, seed: int, batch: int = 16) -> list[dict]:
    """n observations of transform ``kind``; ``device`` 'cpu-per-cube' is the Dataset's path (one cube at a
    time, seeded per cube), any torch device runs ``transform_batch`` (the loop's ``--transform-on device`` path) on
    a batch of that device, under other seeds."""
    from nnunet_sar.pretraining.corruptions import corrupt, genesis_corruptions
    from nnunet_sar.pretraining.cubes import transform_batch
    tr = genesis_corruptions(**STAT_PIPELINES[kind])
    clean = _distinct_cube(cube_shape, seed)
    out = []
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        if device == "cpu-per-cube":
            for i in range(n):
                torch.manual_seed(seed * 100_003 + i)
                out.append(observe(kind, clean, *corrupt(clean, tr)))
        else:
            cubes = clean[None].expand(batch, *clean.shape).contiguous().to(device)
            while len(out) < n:
                seeds = [seed * 7_919 + 1_000_003 + len(out) + b for b in range(batch)]
                done = transform_batch(tr, {"image": cubes, "target": cubes.clone()}, seeds)
                out += [observe(kind, clean, done["image"][b], done["target"][b]) for b in range(min(batch, n - len(out)))]
    return out


def _rate_ok(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k / n - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


def _two_ok(k1: int, k2: int, n: int, sigmas: float = 4.0) -> bool:
    p = (k1 + k2) / (2 * n)
    return abs(k1 - k2) / n <= sigmas * math.sqrt(max(2 * p * (1 - p), 1e-12) / n) + 1e-12


def corruption_statistics(device: str, n: int, cube_shape, seed: int = 7) -> dict:
    """Rates, ranges and checks of the device path (``transform_batch``) on ``device`` and of the per-cube CPU path."""
    shape = list(cube_shape)
    box_one = math.prod(1.0 / max(1, int(s * 0.1)) for s in shape)  # a 1-voxel box shuffles nothing
    # a painting that changes nothing: in-painting whose first box (p 0.95) was not drawn
    expected = {"flip": net_flip_rate(0.4), "shuffle": 0.5 * (1 - box_one), "nonlinear": 0.9, "inverted_share": 0.5,
                "paint": 0.9 * (1 - 0.2 * 0.05), "outpaint_share": 0.8 / (0.8 + 0.2 * 0.95)}
    res = {"samples_per_path": n, "cube": shape, "expected": expected, "paths": {}, "checks": {}}
    batch_path = f"transform_batch on {device}"
    for path, where in ((batch_path, device), ("per cube on cpu", "cpu-per-cube")):
        obs = {k: corruption_samples(k, where, n, shape, seed) for k in STAT_PIPELINES}
        painted = [o for o in obs["paint"] if o["applied"]]
        applied_nl = [o for o in obs["nonlinear"] if o["applied"]]
        noise_n = sum(o["noise_n"] for o in painted)
        res["paths"][path] = {
            "counts": {"flip": sum(o["flipped"] for o in obs["flip"]), "shuffle": sum(o["applied"] for o in obs["shuffle"]),
                       "nonlinear": len(applied_nl), "inverted": sum(o["inverted"] for o in applied_nl),
                       "paint": len(painted), "outpaint": sum(o["outpaint"] for o in painted)},
            "flips_alike": all(o["alike"] and o["recognised"] for o in obs["flip"]),
            "shuffle_is_permutation": all(o["permutation"] for o in obs["shuffle"]),
            "targets_clean_unless_flipped": all(o["target_clean"] for k in ("shuffle", "nonlinear", "paint") for o in obs[k]),
            "min": min(o["min"] for v in obs.values() for o in v), "max": max(o["max"] for v in obs.values() for o in v),
            "noise_mean": sum(o["noise_sum"] for o in painted) / max(1, noise_n), "noise_voxels": noise_n,
        }
    d, c = res["paths"][batch_path]["counts"], res["paths"]["per cube on cpu"]["counts"]
    checks = res["checks"]
    for name, key, denom_key, p in (("flip rate", "flip", None, expected["flip"]),
                                    ("shuffle rate", "shuffle", None, expected["shuffle"]),
                                    ("non-linear rate", "nonlinear", None, 0.9),
                                    ("inverted share", "inverted", "nonlinear", 0.5),
                                    ("painting rate", "paint", None, expected["paint"]),
                                    ("out-painting share", "outpaint", "paint", expected["outpaint_share"])):
        nd, nc = (d[denom_key], c[denom_key]) if denom_key else (n, n)
        checks[f"{name}: batch vs expected"] = _rate_ok(d[key], nd, p)
        checks[f"{name}: per cube vs expected"] = _rate_ok(c[key], nc, p)
        checks[f"{name}: batch vs per cube"] = _two_ok(d[key] * min(nd, nc) / max(nd, 1), c[key] * min(nd, nc) / max(nc, 1),
                                                    max(1, min(nd, nc)))
    for path, r in res["paths"].items():
        checks[f"{path}: flips applied to input and target alike"] = r["flips_alike"]
        checks[f"{path}: shuffling permutes voxels"] = r["shuffle_is_permutation"]
        checks[f"{path}: target is the clean cube unless flipped"] = r["targets_clean_unless_flipped"]
        checks[f"{path}: values within [0, 1]"] = 0.0 <= r["min"] and r["max"] <= 1.0
        sd = math.sqrt(1 / 12 / max(1, r["noise_voxels"]))
        checks[f"{path}: painting noise mean 0.5"] = abs(r["noise_mean"] - 0.5) <= 6 * sd + 1e-3
    res["all_within_bounds"] = all(checks.values())
    return res


def check_corruption_statistics(rep: Report, device: str, sz: dict):
    t = time.time()
    res = corruption_statistics(device, sz["stat_samples"], sz["stat_cube"])
    failed = [k for k, v in res["checks"].items() if not v]
    label = f"transform_batch (--transform-on device) on {device.upper()} tensors"
    rep.check("corruption_statistics", not failed, f"{label} vs the per-cube CPU path, same seeds, 4-sigma binomial "
              f"bounds" + (f"; failed: {failed}" if failed else ""), seconds=round(time.time() - t, 1), **res)


# ----------------------------------------------------------------------------------------------
# 6. DDP with one process
# ----------------------------------------------------------------------------------------------
def check_ddp(rep: Report, device: str, sz: dict):
    from nnunet_sar.checkpoint import load_checkpoint_file, pretrain_output_folder
    common = ["-d", str(DEMO_ID), "--sources", "902", "903", "--epochs", "1", "--iters-per-epoch", "2",
              "--batch-size", str(sz["resume_batch"]), "--patch-size", "32", "32", "32", "--lr-unet", "0.1",
              "--val-cubes-per-volume", "1", "1", "1", "-device", device, "--num-workers", "0", "--overwrite"]
    runs = {"no_ddp": ("nnUNetPlans_gpucheckNoDDP", [_exe("nnunet_sar_pretrain"), "-num_gpus", "1"]),
            "torchrun": ("nnUNetPlans_gpucheckDDP", [_exe("torchrun"), "--standalone", "--nproc_per_node", "1",
                                                     "--no-python", _exe("nnunet_sar_pretrain")])}
    weights, logs, seconds = {}, {}, {}
    for name, (plans, cmd) in runs.items():
        _plans_copy(str(DEMO_ID), plans)
        t = time.time()
        _sh(cmd + common + ["-p", plans])
        seconds[name] = round(time.time() - t, 1)
        folder = pretrain_output_folder("Dataset901_SARPhantomTumorMRI", "sar", plans, "3d_fullres")
        weights[name] = load_checkpoint_file(join(folder, "checkpoint_final.pth"))
        logs[name] = open(join(folder, sorted(f for f in os.listdir(folder) if f.startswith("training_log"))[-1])).read()
    a, b = weights["no_ddp"]["network_weights"], weights["torchrun"]["network_weights"]
    max_diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    bitwise = all(torch.equal(a[k], b[k]) for k in a)
    ddp_active = "weights identical on all 1 ranks" in logs["torchrun"]
    backend = "nccl" if device == "cuda" else "gloo"
    val = {k: w["logging"]["val_loss"] for k, w in weights.items()}
    ok = ddp_active and max_diff <= 1e-4
    rep.check(f"ddp_torchrun_1proc_{backend}", ok, f"torchrun --nproc_per_node 1 ({backend}, DDP active: {ddp_active}) vs "
              f"-num_gpus 1 (no process group), 1 epoch; weights bitwise equal: {bitwise}, max |diff| {max_diff:.3g}",
              max_abs_weight_diff=max_diff, bitwise_equal=bitwise, ddp_active=ddp_active, val_loss=val, seconds=seconds)
    if device != "cuda":
        rep.needs_cuda("ddp_nccl", "NCCL and SyncBatchNorm run on CUDA only; gloo ran the same DDP code on the CPU")


# ----------------------------------------------------------------------------------------------
# 7. throughput
# ----------------------------------------------------------------------------------------------
class _NoAutocast:
    """Stands in for the ``torch`` module inside loop.py while timing AMP off: autocast disabled, the rest torch."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def autocast(device_type, enabled=True, **kw):
        return torch.autocast(device_type, enabled=False)


@contextlib.contextmanager
def amp_off(tr):
    import nnunet_sar.pretraining.loop as loop
    scaler, loop.torch = tr.grad_scaler, _NoAutocast()
    tr.grad_scaler = None
    try:
        yield
    finally:
        loop.torch, tr.grad_scaler = torch, scaler


def loader_rate(tr, workers: int, n_batches: int) -> float:
    """Cubes/s of the loop's loader (clean cubes, as for an accelerator) with ``workers`` processes, after the
    first batch (worker start-up excluded)."""
    tr.s.num_workers, tr.s.iters_per_epoch = workers, n_batches + 1
    it = iter(tr._loader())
    next(it)
    t = time.perf_counter()
    n = sum(len(b["image"]) for b in it)
    rate = n / (time.perf_counter() - t)
    tr.current_epoch += 1  # fresh keys next time
    return rate


def clean_batches(tr, batch: int, n: int) -> list:
    """n (batch, seeds) of clean cubes from the loop's loader, as --transform-on device feeds the step (which
    corrupts them)."""
    tr.batch_size, tr.s.num_workers, tr.s.iters_per_epoch = batch, 0, n
    out = list(tr.batches())
    tr.current_epoch += 1
    return out


def step_rate(tr, device: str, batches: list, warmup: int) -> dict:
    """Seconds per step on pre-loaded clean batches: ``_step`` with the corruptions inside it, on the device;
    forward, loss, backward, clip, SGD."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, (b, seeds) in enumerate(batches):
        _sync(device)
        t = time.perf_counter()
        tr._step(b, train=True, seeds=seeds)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    s = float(np.median(times))
    n = len(batches[0][0]["image"])
    out = {"step_s": s, "steps_per_s": 1 / s, "cubes_per_s": n / s}
    if device == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def throughput(rep: Report, device: str, sz: dict, plan_dataset: str, root: str):
    from nnunet_sar.commands.benchmark import finetune_overhead
    from nnunet_sar.network import load_plans
    _, cm, _ = load_plans(plan_dataset)
    patches = {"paper cube": list(sz["paper_cube"]), "plan patch": list(cm.patch_size)}
    rows, loaders = [], {}
    for label, patch in patches.items():
        plans = _plans_copy(plan_dataset, f"nnUNetPlans_gpucheckTP{len(rows)}")
        tr = _trainer(_settings(device, plans, dataset=plan_dataset, patch_size=patch, batch_size=sz["batches"][0],
                                iters_per_epoch=1))
        if tr.device.type == "cpu":
            tr.grad_scaler = None
        batches = sorted(set(sz["batches"]) | ({cm.batch_size} if label == "plan patch" else set()))
        for b in batches:
            loaded = clean_batches(tr, b, sz["warmup"] + sz["timed"])
            for amp in ((True, False) if device == "cuda" else (False,)):
                row = {"patch": label, "size": patch, "batch": b, "amp": amp}
                try:
                    with contextlib.nullcontext() if amp else amp_off(tr):
                        row.update(step_rate(tr, device, loaded, sz["warmup"]))
                except torch.cuda.OutOfMemoryError:
                    row["oom"] = True
                    tr.optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                rows.append(row)
            del loaded
        tr.batch_size = sz["batches"][len(sz["batches"]) // 2]
        loaders[label] = {w: loader_rate(tr, w, sz["loader_batches"]) for w in sz["workers"]}
        del tr
    # nnU-Net's own step at the plan (and nnUNetTrainerSAR's: the fine-tuning overhead)
    ft = finetune_overhead(plan_dataset, root, iterations=sz["finetune_iterations"], device=device)
    same = [r for r in rows if r["patch"] == "plan patch" and r["batch"] == cm.batch_size and r["amp"] == (device == "cuda")
            and "step_s" in r]
    ratio = same[0]["step_s"] / ft["plain_step_s"] if same else None
    for r in rows:
        r["loader_cubes_per_s"] = {str(w): v for w, v in loaders[r["patch"]].items()}
        if "cubes_per_s" in r:
            best = max(loaders[r["patch"]].values())
            r["bottleneck"] = "loader" if best < r["cubes_per_s"] else "step"
    ok = all(("step_s" in r and math.isfinite(r["step_s"])) or r.get("oom") for r in rows) and ratio is not None
    rep.check("throughput", ok, f"SAR _step at {patches}; batch {sz['batches']}; loader workers {sz['workers']}; "
              f"SAR step / nnUNetTrainer step at the plan ({list(cm.patch_size)}, batch {cm.batch_size}) = "
              f"{ratio if ratio is None else round(ratio, 3)}", rows=rows,
              nnunet_step_s=ft["plain_step_s"], sar_over_nnunet_step=ratio, ratio_patch=list(cm.patch_size),
              ratio_batch=cm.batch_size, plan=plan_dataset)
    if device != "cuda":
        rep.needs_cuda("throughput.amp_on", "autocast is enabled on CUDA only; AMP-off figures above")
        rep.needs_cuda("throughput.peak_gpu_memory", "no GPU")
    return ft


def finetune_epoch(rep: Report, device: str, ft: dict, plan_dataset: str):
    iters = NNUNET_ITERATIONS_PER_EPOCH
    sar_epoch, plain_epoch = ft["sar_step_s"] * iters, ft["plain_step_s"] * iters
    rep.check("finetune_overhead", math.isfinite(ft["ratio"]),
              f"nnUNetTrainerSAR vs nnUNetTrainer train_step on the same batches ({plan_dataset}); per epoch = median "
              f"step x {iters} iterations", sar_epoch_s=sar_epoch, plain_epoch_s=plain_epoch,
              overhead_per_epoch_s=sar_epoch - plain_epoch, step_ratio=ft["ratio"], sar_step_s=ft["sar_step_s"],
              plain_step_s=ft["plain_step_s"], iterations_per_epoch=iters,
              sar_initialize_s=ft["sar_initialize_s"], plain_initialize_s=ft["plain_initialize_s"],
              patch=ft["patch"], batch=ft["batch_size"], iterations=ft["iterations"])


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def plan_fullres(sz: dict) -> str:
    """CUDA only: a phantom MRI target at a size for which nnU-Net plans a full-resolution patch."""
    from nnunet_sar.phantoms import write_phantom_dataset
    write_phantom_dataset(os.environ["nnUNet_raw"], FULLRES_ID, "SARFullRes", "MRI", num_training=sz["fullres_cases"],
                          shape=tuple(sz["fullres_shape"]), seed=5, overwrite=True)
    _sh([_exe("nnUNetv2_plan_and_preprocess"), "-d", str(FULLRES_ID), "-c", "3d_fullres", "-np", "8", "-npfp", "4"],
        env={**os.environ, "nnUNet_n_proc_DA": "1"})
    return f"Dataset{FULLRES_ID:03d}_SARFullRes"


def table(res: dict) -> str:
    lines = [f"nnunet_sar_benchmark --gpu-check -device {res['device']} on {res['machine']}, {res['date']}, "
             f"{res['seconds']:.0f} s: {res['summary']}", f"{'path':<52}{'status':<22}figures"]
    for e in res["entries"]:
        f = e["figures"]
        short = {k: v for k, v in f.items() if k not in ("rows", "paths", "checks", "expected", "traceback",
                                                          "total_loss", "grad_scale", "differing")}
        text = ", ".join(f"{k} {_fmt(v)}" for k, v in short.items())
        lines.append(f"{e['path']:<52}{e['status']:<22}{text}"[:400])
    tp = next((e for e in res["entries"] if e["path"] == "throughput" and "rows" in e["figures"]), None)
    if tp:
        lines.append("")
        lines.append(f"{'SAR _step':<12}{'size':<14}{'batch':>6}{'amp':>6}{'steps/s':>9}{'cubes/s':>9}{'GiB':>7}"
                     f"  loader cubes/s by workers  bottleneck")
        for r in tp["figures"]["rows"]:
            if r.get("oom"):
                lines.append(f"{r['patch']:<12}{'x'.join(map(str, r['size'])):<14}{r['batch']:>6}{str(r['amp']):>6}  OOM")
                continue
            mem = f"{r['peak_gpu_mem_gib']:.1f}" if "peak_gpu_mem_gib" in r else "-"
            lines.append(f"{r['patch']:<12}{'x'.join(map(str, r['size'])):<14}{r['batch']:>6}{str(r['amp']):>6}"
                         f"{r['steps_per_s']:>9.2f}{r['cubes_per_s']:>9.1f}{mem:>7}  "
                         f"{' '.join(f'{w}:{v:.0f}' for w, v in r['loader_cubes_per_s'].items()):<26} {r['bottleneck']}")
        f = tp["figures"]
        if f.get("sar_over_nnunet_step") is not None:
            lines.append(f"nnUNetTrainer.train_step at the plan: {f['nnunet_step_s']:.3f} s; SAR step / nnU-Net step "
                         f"{f['sar_over_nnunet_step']:.2f}")
    return "\n".join(lines)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def build_parser():
    p = argparse.ArgumentParser(prog="nnunet_sar_benchmark --gpu-check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: the issue's sizes on one GPU; cpu: tiny sizes, CUDA-only parts skipped [%(default)s]")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write the results here, and the table beside it as .txt [gpu_check_<device>.json]")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder, removed)")
    p.add_argument("--skip", nargs="*", default=[], choices=["demo", "steps", "resume", "statistics", "ddp", "throughput"],
                   help="leave out these parts (reported as not run)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("nnunet_sar_benchmark --gpu-check: error: -device cuda but no CUDA device is available "
                 "(-device cpu runs the CPU form)")
    sz = SIZES[args.device]
    root = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="nnunet_sar_gpu_check_")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # before nnunetv2 is imported
        os.environ[k] = join(root, k)
        os.makedirs(os.environ[k], exist_ok=True)
    os.environ.update({"nnUNet_compile": "0", "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", "2"),
                       "CUBLAS_WORKSPACE_CONFIG": ":4096:8"})  # deterministic cuBLAS for the resume check
    os.environ.setdefault("nnUNet_n_proc_DA", "0" if args.device == "cpu" else "4")
    from nnunet_sar.commands.benchmark import machine_info
    machine = machine_info()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{machine['cpu']} ({machine['nproc']} cores)"
    rep, t0 = Report(args.device), time.time()
    try:
        if "demo" not in args.skip:
            check_demo(rep, args.device)
        elif not os.path.isdir(join(os.environ["nnUNet_preprocessed"], "Dataset901_SARPhantomTumorMRI")):
            _sh([_exe("nnunet_sar_demo"), "-device", args.device, "--use-nnunet-env", "--tiny", "--overwrite"], timeout=1200)
        if "steps" not in args.skip:
            ckpt = None
            with rep.guard("pretrain_steps"):
                ckpt = check_pretrain_steps(rep, args.device, sz, root)
            if ckpt:
                with rep.guard("checkpoint_cpu_only"):
                    check_cpu_only_load(rep, ckpt)
        if "resume" not in args.skip:
            with rep.guard("resume_bit_identical"):
                check_resume(rep, args.device, sz)
        if "statistics" not in args.skip:
            with rep.guard("corruption_statistics"):
                check_corruption_statistics(rep, args.device, sz)
        if "ddp" not in args.skip:
            with rep.guard("ddp"):
                check_ddp(rep, args.device, sz)
        if "throughput" not in args.skip:
            ft = None
            with rep.guard("throughput"):
                plan_dataset = plan_fullres(sz) if args.device == "cuda" else f"Dataset{DEMO_ID}_SARPhantomTumorMRI"
                ft = throughput(rep, args.device, sz, plan_dataset, root)
            if ft:
                with rep.guard("finetune_overhead"):
                    finetune_epoch(rep, args.device, ft, plan_dataset)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    counts = {s: sum(e["status"] == s for e in rep.entries) for s in ("pass", "fail", NEEDS_CUDA)}
    res = {"device": args.device, "machine": name, "machine_info": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                                   time.gmtime()),
           "seconds": time.time() - t0, "skipped_parts": args.skip, "sizes": sz,
           "summary": f"{counts['pass']} pass, {counts['fail']} fail, {counts[NEEDS_CUDA]} {NEEDS_CUDA}",
           "entries": rep.entries}
    out = args.json or f"gpu_check_{args.device}.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    text = table(res)
    with open(os.path.splitext(out)[0] + ".txt", "w") as f:
        f.write(text + "\n")
    print("\n" + text + f"\n\nwritten: {out} and {os.path.splitext(out)[0]}.txt", flush=True)
    return 1 if counts["fail"] else 0
