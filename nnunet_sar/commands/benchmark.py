"""``nnunet_sar_benchmark``: what SAR pre-training costs, measured on this machine in one run.

Figures (all single-threaded: OMP_NUM_THREADS=1 and ``torch.set_num_threads(1)``, so "per second" is
"per second per CPU core"; paired measurements are interleaved so that background load hits both sides):

1. **Cube throughput** at 64x64x32 (the paper's cube) and 128^3: cubes per second of the complete SAR
   input pipeline (``MultiScaleCubes`` on memory-mapped float16 ``.npy`` volumes: crop at 1/2, 1/4, 1/8
   of the side, trilinear resize, all Models Genesis corruptions of ``genesis_corruptions()``) against
   ``ReferenceGenesis``, a plain-loop numpy port of Models Genesis' public ``generate_pair`` (python
   loop over 10,000 local-shuffle boxes, ``np.interp`` on a 100,000-point Bezier curve, painting loops
   with its probabilities) fed by a numpy crop + ``scipy.ndimage.zoom(order=1)`` of the same volumes,
   crop sizes and scale mix. speedup = ours / reference. Target: >= 10x at both sizes.
2. **Step overhead**: time of one pre-training step (forward, loss, backward, gradient clipping, SGD)
   of the full SAR objective (U-Net + scale head S + discriminator M, ``sar_terms``) divided by that
   of restoration only (variant ``genesis``: the same U-Net weights, no heads) on the same batch of
   64x64x32 cubes. The U-Net is ``build_pretraining_network`` of real nnU-Net plans (a phantom target
   planned by ``nnUNetv2_plan_and_preprocess``). Target: <= 1.15x.
3. **Fine-tuning overhead**: ``nnUNetTrainerSAR.train_step`` time divided by ``nnUNetTrainer.train_step``
   time on the same batches of nnU-Net's own data loader, after ``initialize()`` (the SAR trainer only
   adds a weight load there, reported separately in seconds: it happens once per training, not per
   epoch). Target: <= 1.02x.
4. **Memory**: peak resident memory (``VmHWM`` of a fresh process) of one pre-training data pass over
   200 memory-mapped source volumes divided by that over 20 (48^3 float16 volumes, 1 + 1 + 2 cubes
   per volume with corruptions). Target: <= 1.2x. The absolute difference is reported too.

With ``-device cuda`` the step timing runs on the GPU and ``transform_batch`` (the corruptions of a batch
on the GPU, as ``--transform-on device`` runs them) is timed as well. The run ends with one line ``speedup 64x64x32: A.Ax 128^3: B.Bx``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

SIZES = {"64x64x32": (64, 64, 32), "128^3": (128, 128, 128)}
TARGETS = {"speedup": 10.0, "step_ratio": 1.15, "finetune_ratio": 1.02, "memory_ratio": 1.2}
# (cubes ours, cubes reference) per size and round; rounds: quick 2, full 5
COUNTS = {"64x64x32": (100, 12), "128^3": (20, 3)}
TARGET_ID = 990


# ----------------------------------------------------------------------------------------------
# the reference: Models Genesis' public code, one cube at a time
# ----------------------------------------------------------------------------------------------
def _bezier_curve(points, n_times=100000):
    """Models Genesis' bezier_curve: Bernstein polynomials evaluated with np.dot."""
    from scipy.special import comb
    n = len(points)
    t = np.linspace(0.0, 1.0, n_times)
    poly = np.array([comb(n - 1, i) * t ** (n - 1 - i) * (1 - t) ** i for i in range(n)])
    return np.dot([p[0] for p in points], poly), np.dot([p[1] for p in points], poly)


class ReferenceGenesis:
    """Models Genesis' ``generate_pair`` for one (1, X, Y, Z) cube in [0, 1], its public config rates.
    Crop + resize as a numpy user would: slice the memmap, ``scipy.ndimage.zoom`` with order 1.
    (Flips pick a spatial axis; the original picks from axes 0-2 of the channel-first cube.)"""

    def __init__(self, seed=0, flip_rate=0.4, local_rate=0.5, nonlinear_rate=0.9, paint_rate=0.9,
                 inpaint_rate=0.2):
        self.random, self.np = random.Random(seed), np.random.RandomState(seed)
        self.flip_rate, self.local_rate, self.nonlinear_rate = flip_rate, local_rate, nonlinear_rate
        self.paint_rate, self.inpaint_rate = paint_rate, inpaint_rate

    def crop_resize(self, arr, crop, patch):
        from scipy.ndimage import zoom
        start = [self.random.randint(0, max(0, s - c)) for s, c in zip(arr.shape, crop)]
        x = np.asarray(arr[tuple(slice(a, a + c) for a, c in zip(start, crop))], dtype=np.float32)
        return zoom(x, [p / s for p, s in zip(patch, x.shape)], order=1)[None]

    def __call__(self, y):
        """Clean cube (1, X, Y, Z) -> (corrupted input, target), float32."""
        x = y.copy()
        cnt = 3
        while self.random.random() < self.flip_rate and cnt > 0:
            axis = 1 + self.random.choice([0, 1, 2])
            x, y = np.flip(x, axis=axis), np.flip(y, axis=axis)
            cnt -= 1
        x = self.local_pixel_shuffling(x)
        x = self.nonlinear_transformation(x)
        if self.random.random() < self.paint_rate:
            x = self.in_painting(x) if self.random.random() < self.inpaint_rate else self.out_painting(x)
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.float32)

    def local_pixel_shuffling(self, x):
        if self.random.random() >= self.local_rate:
            return x
        r = self.random
        image_temp, orig = x.copy(), x.copy()
        _, rows, cols, deps = x.shape
        for _ in range(10000):
            bx, by, bz = r.randint(1, rows // 10), r.randint(1, cols // 10), r.randint(1, deps // 10)
            nx, ny, nz = r.randint(0, rows - bx), r.randint(0, cols - by), r.randint(0, deps - bz)
            window = orig[0, nx:nx + bx, ny:ny + by, nz:nz + bz].flatten()
            self.np.shuffle(window)
            image_temp[0, nx:nx + bx, ny:ny + by, nz:nz + bz] = window.reshape((bx, by, bz))
        return image_temp

    def nonlinear_transformation(self, x):
        r = self.random
        if r.random() >= self.nonlinear_rate:
            return x
        points = [[0, 0], [r.random(), r.random()], [r.random(), r.random()], [1, 1]]
        xvals, yvals = _bezier_curve(points, n_times=100000)
        if r.random() < 0.5:
            xvals = np.sort(xvals)
        else:
            xvals, yvals = np.sort(xvals), np.sort(yvals)
        return np.interp(x, xvals, yvals)

    def _box(self, shape, sizes):
        return tuple(slice(a, a + s) for a, s in
                     ((self.random.randint(3, n - s - 3), s) for n, s in zip(shape, sizes)))

    def in_painting(self, x):
        r, shape = self.random, x.shape[1:]
        x = x.copy()
        cnt = 5
        while cnt > 0 and r.random() < 0.95:
            sizes = [r.randint(n // 6, n // 3) for n in shape]
            x[(slice(None),) + self._box(shape, sizes)] = self.np.rand(*sizes) * 1.0
            cnt -= 1
        return x

    def out_painting(self, x):
        r, shape = self.random, x.shape[1:]
        image_temp = x.copy()
        x = self.np.rand(*x.shape) * 1.0
        cnt = 5  # the first window always, then up to 4 more with probability 0.95 each
        while cnt == 5 or (cnt > 0 and r.random() < 0.95):
            sizes = [n - r.randint(3 * n // 7, 4 * n // 7) for n in shape]
            box = (slice(None),) + self._box(shape, sizes)
            x[box] = image_temp[box]
            cnt -= 1
        return x


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def write_volumes(folder, n, shape=(48, 48, 48), seed=0):
    """n preprocessed source volumes (float16 .npy in [0, 1], alternately CT and MRI phantoms) as
    ``sources.Volume`` records, the form ``preprocess_sources`` returns."""
    from scipy.ndimage import zoom

    from nnunet_sar.phantoms import make_phantom
    from nnunet_sar.pretraining.sources import Volume
    os.makedirs(folder, exist_ok=True)
    small = tuple(max(8, s // 4) for s in shape)
    volumes = []
    for i in range(n):
        modality = ("CT", "MRI")[i % 2]
        img, _ = make_phantom(modality, small, tumor_size="medium", seed=seed + i)
        img = zoom(img, [s / t for s, t in zip(shape, small)], order=1)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
        path = os.path.join(folder, f"vol_{i:04d}.npy")
        np.save(path, img.astype(np.float16))
        volumes.append(Volume(path, tuple(img.shape), modality, "bench", f"vol_{i:04d}", 0))
    return volumes


def our_cubes(volumes, patch, seed=0):
    """The SAR input pipeline: MultiScaleCubes with all Models Genesis corruptions."""
    from nnunet_sar.pretraining.corruptions import genesis_corruptions
    from nnunet_sar.pretraining.cubes import MultiScaleCubes
    return MultiScaleCubes(volumes, patch, transforms=genesis_corruptions(), seed=seed)


def reference_cubes(volumes, patch, n, seed=0):
    """n (input, target) pairs of the reference, over the same volume / scale plan as ``our_cubes``."""
    from nnunet_sar.pretraining.cubes import SCALES, crop_size
    ds, ref = our_cubes(volumes, patch, seed), ReferenceGenesis(seed)
    vols, scales = ds.plan(0)
    arrays = [np.load(v.path, mmap_mode="r") for v in volumes]
    for i in range(n):
        v, s = int(vols[i % len(vols)]), int(scales[i % len(vols)])
        yield ref(ref.crop_resize(arrays[v], crop_size(volumes[v].shape, SCALES[s]), patch))


# ----------------------------------------------------------------------------------------------
# 1. throughput
# ----------------------------------------------------------------------------------------------
def throughput(volumes, patch, n_ours, n_ref, rounds=2, seed=0):
    """(our cubes/s, reference cubes/s) on this thread, rounds interleaved, after one warm-up each."""
    ds = our_cubes(volumes, patch, seed)
    next(iter(reference_cubes(volumes, patch, 1, seed + 99)))
    ds[(999, 0)]
    t_ours = t_ref = 0.0
    for r in range(rounds):
        t = time.perf_counter()
        for i in range(n_ours):
            ds[(r, i % len(ds))]
        t_ours += time.perf_counter() - t
        t = time.perf_counter()
        for _ in reference_cubes(volumes, patch, n_ref, seed + r):
            pass
        t_ref += time.perf_counter() - t
    return rounds * n_ours / t_ours, rounds * n_ref / t_ref


def summary_line(speedup_small, speedup_large):
    return f"speedup 64x64x32: {speedup_small:.1f}x 128^3: {speedup_large:.1f}x"


# ----------------------------------------------------------------------------------------------
# 2. pre-training step overhead
# ----------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_overhead(plans_manager, configuration_manager, patch=(64, 64, 32), batch_size=2, steps=3,
                  device="cpu"):
    """Median seconds per step of full SAR and of restoration only, and the median of their ratios."""
    from nnunet_sar.network import build_pretraining_network
    from nnunet_sar.pretraining.corruptions import genesis_corruptions
    from nnunet_sar.pretraining.cubes import transform_batch
    from nnunet_sar.pretraining.model import SARNetwork
    from nnunet_sar.pretraining.objectives.sar import sar_terms
    device = torch.device(device)
    torch.manual_seed(0)
    unet = build_pretraining_network(plans_manager, configuration_manager, num_channels=1, norm="batch")
    nets = {"sar": SARNetwork(copy.deepcopy(unet), 3, 2, True, True).to(device),
            "genesis": SARNetwork(copy.deepcopy(unet), 3, 2, False, False).to(device)}
    opts = {k: torch.optim.SGD(n.parameters(), lr=1e-2, momentum=0.9) for k, n in nets.items()}
    clean = torch.rand(batch_size, 1, *patch)
    done = transform_batch(genesis_corruptions(), {"image": clean, "target": clean.clone()}, range(batch_size))
    image, target = done["image"].to(device), done["target"].to(device)
    scale = torch.arange(batch_size, device=device) % 3
    modality = torch.arange(batch_size, device=device) % 2

    def step(name):
        net, opt = nets[name], opts[name]
        _sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            restored, scale_logits, modality_logits = net(image)
            res = torch.nn.functional.mse_loss(torch.sigmoid(restored.float()), target)
            terms = sar_terms(res, scale_logits, modality_logits, scale, modality, alpha=1.0, beta=10.0)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        _sync(device)
        return time.perf_counter() - t

    times = {"sar": [], "genesis": []}
    for i in range(steps + 1):  # the first pair warms up
        for name in (("sar", "genesis") if i % 2 else ("genesis", "sar")):
            dt = step(name)
            if i:
                times[name].append(dt)
    ratio = statistics.median(a / b for a, b in zip(times["sar"], times["genesis"]))
    return {"sar_s": statistics.median(times["sar"]), "genesis_s": statistics.median(times["genesis"]),
            "ratio": ratio, "patch": list(patch), "batch_size": batch_size, "steps": steps}


def gpu_corruption_throughput(batch_sizes=(16, 4), repeats=5):
    """cubes/s of ``transform_batch`` (``--transform-on device``) on CUDA batches of 64x64x32 and 128^3 cubes."""
    from nnunet_sar.pretraining.corruptions import genesis_corruptions
    from nnunet_sar.pretraining.cubes import transform_batch
    tr, out = genesis_corruptions(), {}
    for (name, patch), b in zip(SIZES.items(), batch_sizes):
        clean = torch.rand(b, 1, *patch, device="cuda")
        batch = {"image": clean, "target": clean.clone()}
        transform_batch(tr, batch, range(b))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for r in range(repeats):
            transform_batch(tr, batch, range(b * (r + 1), b * (r + 2)))
        torch.cuda.synchronize()
        out[name] = repeats * b / (time.perf_counter() - t)
    return out


# ----------------------------------------------------------------------------------------------
# 3. fine-tuning overhead
# ----------------------------------------------------------------------------------------------
def prepare_target(root, num_training=6, shape=(48, 48, 48)):
    """A phantom MRI tumor dataset planned and preprocessed by nnU-Net (3d_fullres) under env
    nnUNet_raw / nnUNet_preprocessed (which must point into ``root``); returns its name."""
    from nnunet_sar.phantoms import write_phantom_dataset
    write_phantom_dataset(os.environ["nnUNet_raw"], TARGET_ID, "SARBench", "MRI", num_training=num_training,
                          shape=shape, seed=1, overwrite=True)
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_plan_and_preprocess")
    env = {**os.environ, "nnUNet_n_proc_DA": "1"}  # nnU-Net's planner crashes with 0
    done = subprocess.run([exe if os.path.exists(exe) else "nnUNetv2_plan_and_preprocess", "-d", str(TARGET_ID),
                           "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nnUNetv2_plan_and_preprocess failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return f"Dataset{TARGET_ID:03d}_SARBench"


def finetune_overhead(dataset, root, iterations=3, device="cpu"):
    """Median train_step seconds of nnUNetTrainerSAR and nnUNetTrainer on the same batches, their ratio,
    and each trainer's initialize() seconds (the SAR one includes the verified weight load)."""
    import contextlib
    import io

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_sar.checkpoint import CHECKPOINT_ENV
    from nnunet_sar.finetuning import nnUNetTrainerSAR
    from nnunet_sar.network import build_target_network, load_plans
    pm, cm, dataset_json = load_plans(dataset)
    ckpt = os.path.join(root, "sar_checkpoint.pth")
    torch.save({"network_weights": build_target_network(pm, cm, dataset_json).state_dict()}, ckpt)
    old = os.environ.get(CHECKPOINT_ENV)
    os.environ[CHECKPOINT_ENV] = ckpt
    trainers, init_s = {}, {}
    try:
        for name, cls in (("nnUNetTrainer", nnUNetTrainer), ("nnUNetTrainerSAR", nnUNetTrainerSAR)):
            with contextlib.redirect_stdout(io.StringIO()):
                plans = {**copy.deepcopy(pm.plans), "continue_training": False}  # nnU-Net 2.8 pops this key
                tr = cls(plans, "3d_fullres", 0, dataset_json, torch.device(device))
                t = time.perf_counter()
                tr.initialize()
                init_s[name] = time.perf_counter() - t
            tr.network.train()
            trainers[name] = tr
    finally:
        if old is None:
            os.environ.pop(CHECKPOINT_ENV, None)
        else:
            os.environ[CHECKPOINT_ENV] = old
    with contextlib.redirect_stdout(io.StringIO()):
        dl_train, _ = trainers["nnUNetTrainer"].get_dataloaders()
        batches = [next(dl_train) for _ in range(iterations + 1)]
    times = {k: [] for k in trainers}
    dev = torch.device(device)
    for i, batch in enumerate(batches):  # the first batch warms up
        for name in (("nnUNetTrainerSAR", "nnUNetTrainer") if i % 2 else ("nnUNetTrainer", "nnUNetTrainerSAR")):
            _sync(dev)
            t = time.perf_counter()
            trainers[name].train_step(batch)
            _sync(dev)
            if i:
                times[name].append(time.perf_counter() - t)
    ratio = statistics.median(a / b for a, b in zip(times["nnUNetTrainerSAR"], times["nnUNetTrainer"]))
    return {"sar_step_s": statistics.median(times["nnUNetTrainerSAR"]),
            "plain_step_s": statistics.median(times["nnUNetTrainer"]), "ratio": ratio,
            "sar_initialize_s": init_s["nnUNetTrainerSAR"], "plain_initialize_s": init_s["nnUNetTrainer"],
            "patch": list(cm.patch_size), "batch_size": cm.batch_size, "iterations": iterations}


# ----------------------------------------------------------------------------------------------
# 4. memory
# ----------------------------------------------------------------------------------------------
def vm_hwm_mb(field="VmHWM"):
    """Peak resident memory of this process so far (VmHWM of /proc/self/status), MiB; ``field`` reads
    another line, e.g. RssFile (resident file pages: the memory-mapped volumes) or RssAnon."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _memory_child(folder, n, patch):
    """Run in a fresh process: one data pass over the first n volumes of ``folder``; prints VmHWM."""
    from nnunet_sar.pretraining.sources import Volume
    torch.set_num_threads(1)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".npy"))[:n]
    volumes = [Volume(os.path.join(folder, f), tuple(np.load(os.path.join(folder, f), mmap_mode="r").shape),
                      ("CT", "MRI")[i % 2], "bench", f[:-4], 0) for i, f in enumerate(files)]
    from nnunet_sar.pretraining.corruptions import genesis_corruptions
    from nnunet_sar.pretraining.cubes import MultiScaleCubes
    ds = MultiScaleCubes(volumes, patch, cubes_per_volume=(1, 1, 2), transforms=genesis_corruptions())
    for i in range(len(ds)):
        ds[i]
    print(" ".join(f"{k}_MB {vm_hwm_mb(k):.2f}" for k in ("RssAnon", "RssFile", "VmHWM")))


# python -P (3.11+): do not put the working directory on sys.path, where a source checkout's nnunet_sar/
# (without its pretraining/ subpackage, which setup.py maps in) would shadow the installed package
_NO_CWD_ON_PATH = ["-P"] if sys.version_info >= (3, 11) else []


def peak_rss_mb(folder, n, patch=(64, 64, 32), fields=False):
    """Peak resident memory (MiB) of a fresh process making one data pass over n volumes of ``folder``
    (``fields=True``: a dict that also holds RssAnon and RssFile at the end of the pass)."""
    code = f"from nnunet_sar.commands.benchmark import _memory_child; _memory_child({folder!r}, {int(n)}, {tuple(patch)!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # cwd: the child must import the installed package, not a source checkout it was started in
    done = subprocess.run([sys.executable, *_NO_CWD_ON_PATH, "-c", code], capture_output=True, text=True, env=env,
                          cwd=folder)
    if done.returncode:
        raise RuntimeError(f"memory pass failed:\n{done.stderr[-3000:]}")
    words = done.stdout.split("RssAnon_MB")[-1].split()
    out = {"RssAnon": float(words[0]), "RssFile": float(words[2]), "VmHWM": float(words[4])}
    return out if fields else out["VmHWM"]


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def machine_info():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": model, "nproc": os.cpu_count(), "loadavg_1_5_15": load, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform()}


def build_parser():
    p = argparse.ArgumentParser(
        prog="nnunet_sar_benchmark", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1].split("\nWith ")[0].replace("``", "").replace("**", ""),
        epilog="Runs single-threaded (re-executes itself with OMP_NUM_THREADS=1) in a temporary folder with its own "
               "nnUNet_raw / nnUNet_preprocessed / nnUNet_results; your nnU-Net folders are never touched.")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (< 5 min on 2 CPU cores); measures everything")
    p.add_argument("--json", metavar="FILE", help="write every figure, the settings and the machine to FILE")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda"],
                   help="device of the step timings; cuda also times transform_batch on the GPU [%(default)s]")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="leave glibc malloc alone (default: corruptions.tune_malloc() in this process)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder, removed)")
    p.add_argument("--gpu-check", action="store_true",
                   help="instead: one run of every accelerator path (AMP, corruptions on the device, CPU-only checkpoint "
                        "load, --continue, DDP, throughput), pass/fail per path; -device cpu runs its tiny CPU form; "
                        "'nnunet_sar_benchmark --gpu-check --help' lists its options")
    p.add_argument("--transfer", action="store_true",
                   help="instead: the transfer benchmark (fine-tuning Dice from each pre-trained start against scratch "
                        "on phantom targets); 'nnunet_sar_benchmark --transfer --help' lists its options")
    return p


def _row(name, ours, ref, unit, target):
    return f"{name:<34}{ours:>14}{ref:>14}  {unit:<10}{target}"


def main(argv=None):
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if "--gpu-check" in argv_list:  # every accelerator path, with its own options (nnunet_sar.commands.gpu_check)
        from nnunet_sar.commands.gpu_check import main as gpu_check_main
        sys.exit(gpu_check_main([a for a in argv_list if a != "--gpu-check"]))
    if "--transfer" in argv_list:  # a benchmark of its own, with its own options
        from nnunet_sar.commands.transfer_benchmark import main as transfer_main
        transfer_main([a for a in argv_list if a != "--transfer"])
        return
    args = build_parser().parse_args(argv)
    if argv is None and os.environ.get("OMP_NUM_THREADS") != "1":  # single-thread numpy, scipy and torch
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        os.execve(sys.executable, [sys.executable, *_NO_CWD_ON_PATH, "-m", "nnunet_sar.commands.benchmark", *sys.argv[1:]], env)
    torch.set_num_threads(1)
    tuned = False if args.no_tune_malloc else __import__("nnunet_sar.pretraining.corruptions",
                                                         fromlist=["tune_malloc"]).tune_malloc()
    root = args.keep or tempfile.mkdtemp(prefix="nnunet_sar_benchmark_")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # before nnunetv2 is imported
        os.environ[k] = os.path.join(root, k)
        os.makedirs(os.environ[k], exist_ok=True)
    os.environ.update({"nnUNet_compile": "0", "nnUNet_n_proc_DA": "0"})
    rounds = 2 if args.quick else 5
    res = {"machine": machine_info(), "settings": {"quick": args.quick, "device": args.device, "threads": 1,
                                                   "tune_malloc": tuned, "rounds": rounds}, "targets": TARGETS}
    t0 = time.time()
    try:
        print("1/4 cube throughput ...", flush=True)
        volumes = write_volumes(os.path.join(root, "sources"), 2, shape=(240, 240, 155))
        res["throughput"] = {"volumes": "2 x 240x240x155 float16 (BraTS-sized), 16:16:32 cubes at 1/2, 1/4, 1/8"}
        for name, patch in SIZES.items():
            n_ours, n_ref = COUNTS[name]
            ours, ref = throughput(volumes, patch, n_ours, n_ref, rounds)
            res["throughput"][name] = {"ours_cubes_per_s": ours, "reference_cubes_per_s": ref, "speedup": ours / ref,
                                       "cubes_ours": rounds * n_ours, "cubes_reference": rounds * n_ref}
        print("2/4 memory ...", flush=True)
        mem_dir = os.path.join(root, "memory_sources")
        write_volumes(mem_dir, 200, shape=(48, 48, 48))
        f20, f200 = peak_rss_mb(mem_dir, 20, fields=True), peak_rss_mb(mem_dir, 200, fields=True)
        m20, m200 = f20["VmHWM"], f200["VmHWM"]
        res["memory"] = {"peak_rss_20_mb": m20, "peak_rss_200_mb": m200, "ratio": m200 / m20,
                         "difference_mb": m200 - m20, "end_of_pass_20_mb": f20, "end_of_pass_200_mb": f200,
                         "volumes": "48^3 float16 (216 KiB each), cubes 1:1:2, 64x64x32"}
        print("3/4 planning a phantom target with nnU-Net ...", flush=True)
        dataset = prepare_target(root)
        from nnunet_sar.network import load_plans
        pm, cm, _ = load_plans(dataset)
        print("    pre-training step overhead ...", flush=True)
        res["step"] = step_overhead(pm, cm, steps=3 if args.quick else 10, device=args.device)
        if args.device == "cuda":
            res["gpu_transform_batch_cubes_per_s"] = gpu_corruption_throughput()
        print("4/4 fine-tuning overhead ...", flush=True)
        res["finetune"] = finetune_overhead(dataset, root, iterations=3 if args.quick else 10, device=args.device)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    res["seconds"] = time.time() - t0
    res["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    tp, st, ft, mem = res["throughput"], res["step"], res["finetune"], res["memory"]
    print(f"\nnnunet_sar_benchmark on {res['machine']['cpu']} ({res['machine']['nproc']} cores), 1 thread, "
          f"load avg at start {res['machine']['loadavg_1_5_15']}, {'quick' if args.quick else 'full'} run, "
          f"{res['seconds']:.0f} s, tune_malloc {'on' if tuned else 'off'}")
    print(_row("figure", "ours / SAR", "reference", "unit", "target"))
    for name in SIZES:
        t = tp[name]
        print(_row(f"cubes/s per core {name}", f"{t['ours_cubes_per_s']:.1f}", f"{t['reference_cubes_per_s']:.2f}",
                   "cubes/s", f"speedup {t['speedup']:.1f}x (>= {TARGETS['speedup']:.0f}x)"))
    print(_row(f"pre-training step ({args.device})", f"{st['sar_s']:.3f}", f"{st['genesis_s']:.3f}", "s",
               f"ratio {st['ratio']:.3f} (<= {TARGETS['step_ratio']})"))
    print(_row(f"fine-tuning train_step ({args.device})", f"{ft['sar_step_s']:.3f}", f"{ft['plain_step_s']:.3f}", "s",
               f"ratio {ft['ratio']:.3f} (<= {TARGETS['finetune_ratio']})"))
    print(_row("fine-tuning initialize()", f"{ft['sar_initialize_s']:.2f}", f"{ft['plain_initialize_s']:.2f}", "s",
               "once per training"))
    print(_row("peak RSS, 200 vs 20 volumes", f"{mem['peak_rss_200_mb']:.0f}", f"{mem['peak_rss_20_mb']:.0f}", "MiB",
               f"ratio {mem['ratio']:.3f} (<= {TARGETS['memory_ratio']})"))
    print(_row("  of which file-backed at the end", f"{mem['end_of_pass_200_mb']['RssFile']:.0f}",
               f"{mem['end_of_pass_20_mb']['RssFile']:.0f}", "MiB", "memory-mapped volume pages (reclaimable)"))
    for name, v in res.get("gpu_transform_batch_cubes_per_s", {}).items():
        print(_row(f"transform_batch on GPU {name}", f"{v:.0f}", "-", "cubes/s", ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(summary_line(tp["64x64x32"]["speedup"], tp["128^3"]["speedup"]))


if __name__ == "__main__":
    main()
