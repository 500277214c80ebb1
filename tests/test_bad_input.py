"""Faults and bad input: kill -9 and --continue through the real console script, atomic checkpoints,
non-finite losses, and every kind of bad input ending in ONE line ``nnunet_sar_pretrain: error: ...``
that names the file, key or value (no traceback), before any training."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from os.path import isfile, join

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SOURCE_IDS, TARGET, TARGET_ID, exe

PREFIX = "nnunet_sar_pretrain: error: "
RUN_DIR = "nnUNetSARPretrain_sar__nnUNetPlansTiny__3d_fullres"
# a tiny network and 16^3 cubes (the tiny plans' total stride is 8): seconds per epoch on 2 CPU cores
FAST = ["-p", "nnUNetPlansTiny", "--patch-size", "16", "16", "16", "--batch-size", "4", "-device", "cpu"]


def _env(results, **extra) -> dict:
    return {**os.environ, "nnUNet_results": str(results), **{k: str(v) for k, v in extra.items()}}


def _pretrain_cmd(*args) -> list:
    return [exe("nnunet_sar_pretrain"), "-d", str(TARGET_ID), *FAST, *args]


def _run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status != 0, no traceback, and the error is the last line of stderr, one line naming `needles`."""
    err = done.stderr
    assert done.returncode != 0, f"exited 0\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-4000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(PREFIX)]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-4000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def write_image(path, arr, spacing=(1.0, 1.0, 1.0)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, str(path))
    return str(path)


def _mri(shape=(20, 20, 20), seed=0):
    return np.random.default_rng(seed).uniform(0, 800, shape).astype(np.float32)


# --------------------------------------------------------------------------- 1. kill -9 and --continue
def _latest_epoch(folder):
    from nnunet_sar.checkpoint import load_checkpoint_file
    return load_checkpoint_file(join(folder, "checkpoint_latest.pth"))["current_epoch"]


@pytest.mark.slow  # pre-training runs through the console script
def test_kill_9_then_continue_ends_with_the_weights_of_an_uninterrupted_run(tiny_plans, tmp_path):
    from nnunet_sar.checkpoint import load_checkpoint_file
    cmd = _pretrain_cmd("--sources", *map(str, SOURCE_IDS), "--epochs", "2", "--iters-per-epoch", "2")
    a, b = tmp_path / "straight", tmp_path / "killed"
    run_b = join(b, TARGET, RUN_DIR)
    straight_log = open(tmp_path / "straight.log", "w+")
    straight = subprocess.Popen(cmd, env=_env(a), stdout=subprocess.DEVNULL, stderr=straight_log)
    killed = subprocess.Popen(cmd, env=_env(b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not isfile(join(run_b, "checkpoint_latest.pth")):
            assert killed.poll() is None, "the run ended before it wrote checkpoint_latest.pth"
            assert time.time() < deadline, "no checkpoint_latest.pth after 240 s"
            time.sleep(0.05)
        os.kill(killed.pid, signal.SIGKILL)  # kill -9: no handler, no finally, no atexit
        assert killed.wait(60) == -signal.SIGKILL
    finally:
        if killed.poll() is None:
            killed.kill()
    assert not isfile(join(run_b, "checkpoint_final.pth"))
    epoch = _latest_epoch(run_b)  # the killed run's checkpoint loads
    assert epoch >= 1
    ckpt = load_checkpoint_file(join(run_b, "checkpoint_latest.pth"))
    assert {"network_weights", "scale_head", "discriminator", "optimizer_state", "lr_scheduler_state",
            "rng_states"} <= set(ckpt)

    resumed = _run(cmd + ["--continue"], _env(b))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"at epoch {epoch}" in resumed.stdout  # "resumed from ... at epoch N"
    assert straight.wait(300) == 0, open(tmp_path / "straight.log").read()[-4000:]
    final_a = torch.load(join(a, TARGET, RUN_DIR, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    final_b = torch.load(join(run_b, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    for part in ("network_weights", "norm_statistics", "scale_head", "discriminator"):
        assert final_a[part].keys() == final_b[part].keys(), part
        for k in final_a[part]:
            assert torch.equal(final_a[part][k], final_b[part][k]), (part, k)
    assert final_a["current_epoch"] == final_b["current_epoch"] == 2
    assert final_a["lr_scheduler_state"] == final_b["lr_scheduler_state"]
    assert [g["lr"] for g in final_a["optimizer_state"]["param_groups"]] == \
           [g["lr"] for g in final_b["optimizer_state"]["param_groups"]]


# --------------------------------------------------------------------------- 2. atomic checkpoints
def _no_temp_files(folder) -> bool:
    return not [f for f in os.listdir(folder) if ".tmp" in f]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), RuntimeError("killed mid-way")])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import atomic_save, load_checkpoint_file
    fname = str(tmp_path / "checkpoint_latest.pth")
    atomic_save({"network_weights": {"w": torch.arange(1000.0)}, "current_epoch": 1}, fname)
    before = open(fname, "rb").read()
    real_save = torch.save

    def partial_save(obj, f, *args, **kwargs):  # writes half a checkpoint, then dies
        real_save(obj, f, *args, **kwargs)
        if hasattr(f, "truncate"):
            f.truncate(100)
        raise failure

    monkeypatch.setattr(torch, "save", partial_save)
    expected = SARError if isinstance(failure, OSError) else RuntimeError
    with pytest.raises(expected) as e:
        atomic_save({"network_weights": {"w": torch.zeros(1000)}, "current_epoch": 2}, fname)
    if expected is SARError:
        assert fname in str(e.value) and "No space left" in str(e.value)
    assert open(fname, "rb").read() == before
    assert load_checkpoint_file(fname)["current_epoch"] == 1
    assert _no_temp_files(tmp_path)


@pytest.mark.slow  # whole pre-training runs / a killed process
def test_kill_9_during_save_never_leaves_a_broken_checkpoint(tmp_path):
    """A process that saves a 40 MB checkpoint over and over, killed at 3 moments: the file always loads."""
    from nnunet_sar.checkpoint import atomic_save, load_checkpoint_file
    fname = str(tmp_path / "checkpoint_latest.pth")
    script = textwrap.dedent(f"""
        import torch
        from nnunet_sar.checkpoint import atomic_save
        i = 0
        while True:
            atomic_save({{"network_weights": {{"w": torch.full((10_000_000,), float(i))}}, "i": i}}, {fname!r})
            if i == 0:
                print("ready", flush=True)
            i += 1
    """)
    for delay in (0.0, 0.11, 0.37):
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        try:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
        ckpt = load_checkpoint_file(fname)
        w = ckpt["network_weights"]["w"]
        assert w.shape == (10_000_000,) and bool((w == ckpt["i"]).all())
    atomic_save({"network_weights": {}, "i": -1}, fname)  # the next save clears what the killed ones left
    assert _no_temp_files(tmp_path) and load_checkpoint_file(fname)["i"] == -1


def test_truncated_checkpoint_is_one_line_error(tmp_path):
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import atomic_save, load_checkpoint_file
    fname = str(tmp_path / "checkpoint_final.pth")
    atomic_save({"network_weights": {"w": torch.ones(10000)}}, fname)
    with open(fname, "r+b") as f:
        f.truncate(os.path.getsize(fname) // 2)
    with pytest.raises(SARError) as e:
        load_checkpoint_file(fname)
    assert fname in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- 4. non-finite losses
@pytest.mark.slow  # whole pre-training runs / a killed process
def test_non_finite_loss_later_keeps_the_last_good_checkpoint(tiny_plans, tmp_path, monkeypatch):
    """Epoch 1 is fine, epoch 2 diverges: the error names epoch 2 and the term, checkpoint_latest.pth of
    epoch 1 stays byte for byte and loads. (Divergence from the start, through the CLI: see cli_runs.)"""
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import load_checkpoint_file
    from nnunet_sar.pretraining.loop import PretrainSettings, SARPretrainer
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    t = SARPretrainer(PretrainSettings(dataset=TARGET, sources=[str(i) for i in SOURCE_IDS],
                                       plans_identifier=tiny_plans, device="cpu", batch_size=4,
                                       patch_size=[16, 16, 16], epochs=3, iters_per_epoch=1))
    t.initialize()
    latest = join(t.output_folder, "checkpoint_latest.pth")
    end_of_epoch, snapshot = t.on_epoch_end, {}

    def diverge_after_epoch_1(*args):
        end_of_epoch(*args)
        snapshot["bytes"] = open(latest, "rb").read()
        t.objective.beta = float("inf")  # L_res weighted by inf: non-finite from now on

    monkeypatch.setattr(t, "on_epoch_end", diverge_after_epoch_1)
    with pytest.raises(SARError) as e:
        t.run_training()
    msg = str(e.value)
    assert "in epoch 2" in msg and "loss term '" in msg and latest in msg and "\n" not in msg
    assert open(latest, "rb").read() == snapshot["bytes"]
    assert load_checkpoint_file(latest)["current_epoch"] == 1
    assert not isfile(join(t.output_folder, "checkpoint_final.pth"))


# --------------------------------------------------------------------------- 5. bad input
@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Bad sources on disk: name -> path (or source spec)."""
    root = tmp_path_factory.mktemp("bad_input")
    out = {"root": root}
    # an nnU-Net raw dataset (given as a folder) whose dataset.json lists an image file that is not there
    raw = root / "Dataset901_Missing"
    write_image(raw / "imagesTr" / "a_0000.nii.gz", _mri())
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1}, "numTraining": 2, "file_ending": ".nii.gz",
        "dataset": {"a": {"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"},
                    "b": {"images": ["imagesTr/gone_0000.nii.gz"], "label": "labelsTr/b.nii.gz"}}}))
    out["missing_dataset"], out["missing_file"] = raw, raw / "imagesTr" / "gone_0000.nii.gz"
    bad_json = root / "Dataset902_BadJson"
    write_image(bad_json / "imagesTr" / "a_0000.nii.gz", _mri())
    (bad_json / "dataset.json").write_text('{"channel_names": ')
    out["bad_json_dataset"] = bad_json
    write_image(root / "corrupt" / "ok.nii.gz", _mri())
    write_image(root / "corrupt" / "broken.nii.gz", _mri())
    with open(root / "corrupt" / "broken.nii.gz", "r+b") as f:
        f.truncate(60)  # a cut-off gzip stream
    write_image(root / "two_d" / "x.nii.gz", _mri((20, 20)))
    write_image(root / "four_d" / "x.nii.gz", _mri((2, 20, 20, 20)))
    nan, inf = _mri(), _mri()
    nan[3, 4, 5] = np.nan
    inf[5, 4, 3], inf[6, 4, 3] = np.inf, -np.inf
    write_image(root / "nan" / "x.nrrd", nan)  # .nrrd: SimpleITK's NIfTI reader turns NaN into 0
    write_image(root / "inf" / "x.nrrd", inf)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    for i in range(2):  # (3, 5, 4) voxels of 1 mm: smaller than every crop for 16^3 cubes
        write_image(root / "small" / f"s{i}.nii.gz", _mri((3, 5, 4), seed=i))
    out["a_file"] = root / "a_file.txt"
    out["a_file"].write_text("a regular file, not a folder: nothing can be created under it")
    return out


def _bad_cases(b) -> dict:
    """name -> (CLI arguments, environment, substrings the one error line must contain)."""
    good = str(SOURCE_IDS[0])
    r = b["root"]
    return {
        "missing_file": (["--sources", good, str(b["missing_dataset"])], {}, [str(b["missing_file"]), "No such file"]),
        "corrupt_dataset_json": (["--sources", str(b["bad_json_dataset"])], {},
                                 [str(b["bad_json_dataset"] / "dataset.json")]),
        "corrupt_file": (["--sources", good, f"{r / 'corrupt'}:MRI"], {},
                         [str(r / "corrupt" / "broken.nii.gz"), "cannot read"]),
        "two_d": (["--sources", good, f"{r / 'two_d'}:MRI"], {}, [str(r / "two_d" / "x.nii.gz"), "3D", "(1, 1, 20, 20)"]),
        "four_d": (["--sources", good, f"{r / 'four_d'}:MRI"], {}, [str(r / "four_d" / "x.nii.gz"), "3D"]),
        "nan": (["--sources", good, f"{r / 'nan'}:MRI"], {}, [str(r / "nan" / "x.nrrd"), "1 non-finite"]),
        "inf": (["--sources", good, f"{r / 'inf'}:CT"], {}, [str(r / "inf" / "x.nrrd"), "2 non-finite"]),
        "empty_source": (["--sources", good, f"{r / 'empty'}:CT"], {}, [f"{r / 'empty'}:CT", "no images"]),
        "unknown_modality": (["--sources", f"{good}:PET"], {}, ["'PET'", f"'{good}:PET'"]),
        "unknown_dataset": (["--sources", "987"], {}, ["'987'", "nnUNet_raw"]),
        "patch_not_divisible": (["--sources", *map(str, SOURCE_IDS), "--patch-size", "20", "16", "16"], {},
                                ["(20, 16, 16)", "(8, 8, 8)", "nnUNetPlansTiny"]),
        "no_validation_cubes_at_the_variant_scale": (
            ["--sources", *map(str, SOURCE_IDS), "--variant", "scale8", "--val-cubes-per-volume", "2", "2", "0"], {},
            ["--val-cubes-per-volume 2 2 0", "scale8", "small"]),
        "results_under_a_file": (["--sources", *map(str, SOURCE_IDS)], {"nnUNet_results": b["a_file"] / "results"},
                                 [str(b["a_file"] / "results")]),
        "cache_under_a_file": (["--sources", *map(str, SOURCE_IDS), "--cache-dir", str(b["a_file"] / "cache")], {},
                               [str(b["a_file"] / "cache")]),
    }


# The real console script as a subprocess, for a sample of the cases (run 3 at a time): no traceback
# reaches the terminal. The others run the same main() in this process (a second each instead of ~8).
IN_SUBPROCESS = ("corrupt_file", "nan", "unknown_dataset", "results_under_a_file")
EPOCH_ARGS = ["--epochs", "1", "--iters-per-epoch", "1"]


@pytest.fixture(scope="module")
def cli_runs(tiny_plans, bad):
    cases = {k: v[:2] for k, v in _bad_cases(bad).items() if k in IN_SUBPROCESS}
    cases["nan_loss_from_the_start"] = (["--sources", *map(str, SOURCE_IDS), "--beta", "nan"], {})
    cases["volume_smaller_than_the_crop"] = (["--sources", str(SOURCE_IDS[0]), f"{bad['root'] / 'small'}:MRI"], {})

    def one(name):
        args, env = cases[name]
        results = bad["root"] / "results" / name
        return _run(_pretrain_cmd(*EPOCH_ARGS, *args), _env(results, **{"nnUNet_results": results, **env}), 240)

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(cases, pool.map(one, cases)))


def _main_in_process(argv, env, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """nnunet_sar_pretrain's main() here: any exception but SystemExit fails the test as a traceback would."""
    from nnunet_sar.pretraining.cli import main
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    capsys.readouterr()
    try:
        main(argv)
        code, extra = 0, ""
    except SystemExit as e:
        code, extra = (e.code, "") if isinstance(e.code, int) or e.code is None else (1, f"{e.code}\n")
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code or 0, out, err + extra)


BAD_INPUTS = ["missing_file", "corrupt_dataset_json", "corrupt_file", "two_d", "four_d", "nan", "inf", "empty_source",
              "unknown_modality", "unknown_dataset", "patch_not_divisible", "no_validation_cubes_at_the_variant_scale",
              "results_under_a_file",
              "cache_under_a_file"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in IN_SUBPROCESS else n
                                  for n in BAD_INPUTS])  # slow: the console-script runs of cli_runs
def test_bad_input_is_one_line_error_before_training(tiny_plans, bad, name, monkeypatch, capsys, request):
    cases = _bad_cases(bad)
    assert sorted(cases) == sorted(BAD_INPUTS)
    args, env, needles = cases[name]
    results = bad["root"] / "results" / f"{name}_in_process"
    if name in IN_SUBPROCESS:
        done = request.getfixturevalue("cli_runs")[name]
    else:
        done = _main_in_process(_pretrain_cmd(*EPOCH_ARGS, *args)[1:], {"nnUNet_results": results, **env},
                                monkeypatch, capsys)
    assert_one_line_error(done, *needles)
    assert "epoch 1/1" not in done.stdout  # failed before any training
    for folder in (results, bad["root"] / "results" / name):
        assert not [f for _, _, fs in os.walk(folder) for f in fs if f.endswith(".pth")]


@pytest.mark.slow  # pre-training runs through the console script
def test_non_finite_loss_from_the_start_names_epoch_and_term(cli_runs, bad):
    line = assert_one_line_error(cli_runs["nan_loss_from_the_start"], "non-finite", "in epoch 1", "loss term '")
    folder = join(bad["root"], "results", "nan_loss_from_the_start", TARGET, RUN_DIR)
    assert not isfile(join(folder, "checkpoint_latest.pth"))
    assert "checkpoint_latest.pth" not in line  # no claim of a checkpoint that does not exist


@pytest.mark.slow  # pre-training runs through the console script
def test_volume_smaller_than_the_crop_is_padded_with_a_warning(cli_runs, bad):
    done = cli_runs["volume_smaller_than_the_crop"]
    assert done.returncode == 0, done.stderr[-4000:]
    warning = [ln for ln in done.stderr.splitlines() if "padded with zeros" in ln]
    assert warning and ("s0_0000.npy" in warning[0] or "s1_0000.npy" in warning[0])  # it names the volume
    assert isfile(join(bad["root"], "results", "volume_smaller_than_the_crop", TARGET, RUN_DIR, "checkpoint_final.pth"))


# --------------------------------------------------------------------------- 5. checkpoints that do not fit
def _sar_trainer(configuration="3d_fullres"):
    from nnunetv2.run.run_training import get_trainer_from_args
    return get_trainer_from_args(TARGET, configuration, 0, "nnUNetTrainerSAR", "nnUNetPlans",
                                 device=torch.device("cpu"))


def _checkpoint_for(tiny_plans, plans, configuration, fname):
    """A SAR-format checkpoint of the network of other plans / another configuration."""
    from nnunet_sar.network import build_pretraining_network, load_plans, nnunet_weights
    pm, cm, _ = load_plans(TARGET, plans, configuration)
    net = build_pretraining_network(pm, cm, num_channels=1)
    torch.save({"network_weights": nnunet_weights(net.state_dict()),
                "settings": {"dataset_name": TARGET, "plans_identifier": plans, "configuration": configuration}},
               fname)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("plans,configuration", [("nnUNetPlansTiny", "3d_fullres"), ("nnUNetPlans", "2d")])
def test_checkpoint_of_other_plans_or_configuration_names_keys_and_shapes(tiny_plans, tmp_path, monkeypatch,
                                                                       plans, configuration):
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import CHECKPOINT_ENV
    bad = str(tmp_path / "other.pth")
    shapes = _checkpoint_for(tiny_plans, plans, configuration, bad)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv(CHECKPOINT_ENV, bad)
    trainer = _sar_trainer()
    with pytest.raises(SARError) as e:
        trainer.initialize()
    msg = str(e.value)
    assert bad in msg and f"made for {TARGET} / {plans} / {configuration}" in msg and "\n" not in msg
    key = "encoder.stages.0.0.convs.0.conv.weight"
    ours = tuple(trainer.network.state_dict()[key].shape)
    assert f"shape {key}: checkpoint {shapes[key]} vs network {ours}" in msg


def test_checkpoint_saved_on_a_gpu_opens_on_the_cpu(tiny_plans, tmp_path, monkeypatch):
    """torch.save records each storage's device; a file written on a GPU ("cuda:0") cannot be opened
    without map_location on a CPU-only machine. We write such a file by making torch.save tag every
    storage "cuda:0", then open it the ways the package does."""
    import torch.serialization
    from nnunet_sar.checkpoint import CHECKPOINT_ENV, load_checkpoint_file, load_pretrained_into
    from nnunet_sar.network import build_target_network, load_plans
    cpu = str(tmp_path / "cpu.pth")
    _checkpoint_for(tiny_plans, "nnUNetPlans", "3d_fullres", cpu)  # fits the target's network
    ckpt = torch.load(cpu, map_location="cpu", weights_only=False)
    gpu = str(tmp_path / "gpu.pth")
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, gpu)
    if not torch.cuda.is_available():  # the file really is a "GPU" file: a plain load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu, weights_only=False)
    loaded = load_checkpoint_file(gpu)
    assert all(v.device.type == "cpu" for v in loaded["network_weights"].values())
    net = build_target_network(*load_plans(TARGET))
    assert load_pretrained_into(net, gpu) > 50
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv(CHECKPOINT_ENV, gpu)
    trainer = _sar_trainer()
    trainer.initialize()  # nnUNetTrainerSAR through nnUNet_SAR_checkpoint
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.equal(trainer.network.state_dict()[key], ckpt["network_weights"][key])


def _one_epoch_run(tiny_plans, tmp_path, monkeypatch):
    """(settings of a tiny pre-training but its epochs, the trainer after one epoch of one step)."""
    from nnunet_sar.pretraining.loop import PretrainSettings, SARPretrainer
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    kw = dict(dataset=TARGET, sources=[str(i) for i in SOURCE_IDS], plans_identifier=tiny_plans, device="cpu",
              batch_size=4, patch_size=[16, 16, 16], iters_per_epoch=1)
    t = SARPretrainer(PretrainSettings(epochs=1, **kw))
    t.initialize()
    t.run_training()
    return kw, t


def test_continue_from_a_gpu_checkpoint_on_the_cpu(tiny_plans, tmp_path, monkeypatch):
    """--continue reads checkpoint_latest.pth with map_location='cpu' as well."""
    from nnunet_sar.pretraining.loop import PretrainSettings, SARPretrainer
    import torch.serialization
    kw, t = _one_epoch_run(tiny_plans, tmp_path, monkeypatch)
    latest = join(t.output_folder, "checkpoint_latest.pth")
    ckpt = torch.load(latest, map_location="cpu", weights_only=False)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, latest)
    resumed = SARPretrainer(PretrainSettings(epochs=2, **kw))
    resumed.initialize(continue_training=True)
    assert resumed.current_epoch == 1
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.equal(resumed.sar_network.unet.state_dict()[key], ckpt["network_weights"][key])


def test_continue_with_other_settings_is_refused_and_keeps_the_runs_record(tiny_plans, tmp_path, monkeypatch):
    """--continue with another learning rate, seed or corruption rate would resume another run than the one
    the checkpoint holds (the restored optimizer overrides a new rate; a new seed changes the validation cubes
    the plateau and the best checkpoint compare): refused, naming the setting, and settings.json stays the
    record of what was trained. More epochs are allowed."""
    from nnunet_sar import SARError
    from nnunet_sar.pretraining.loop import PretrainSettings, SARPretrainer
    kw, t = _one_epoch_run(tiny_plans, tmp_path, monkeypatch)
    record = join(t.output_folder, "settings.json")
    before = open(record).read()
    for change, needle in (({"lr_unet": 0.5}, "lr_unet: checkpoint 0.01, now 0.5"), ({"seed": 7}, "seed"),
                           ({"corruptions": {**t.s.corruptions, "paint_p": 0.0}}, "corruptions"),
                           ({"optimizer": "adam"}, "optimizer")):
        with pytest.raises(SARError, match=needle):
            SARPretrainer(PretrainSettings(epochs=2, **kw, **change)).initialize(continue_training=True)
        assert open(record).read() == before, change
    resumed = SARPretrainer(PretrainSettings(epochs=2, **kw))
    resumed.initialize(continue_training=True)
    assert resumed.current_epoch == 1 and '"epochs": 2' in open(record).read()


@pytest.mark.parametrize("flag,value,needle", [
    ("--batch-size", "0", "expected an integer >= 1"), ("--iters-per-epoch", "-1", "expected an integer >= 1"),
    ("--epochs", "0", "expected an integer >= 1"), ("--val-fraction", "1.5", "must lie in [0, 1)"),
    ("--patch-size", "x", "'x' is not an integer")])
def test_numbers_out_of_range_are_refused_by_the_parser(flag, value, needle, capsys):
    """Before: --batch-size 0 or --iters-per-epoch 0 silently meant "the default", --val-fraction 1.5 and a
    negative count failed with a traceback after the sources' preprocessing."""
    from nnunet_sar.pretraining.cli import settings_from_args
    extra = [value, "16", "16"] if flag == "--patch-size" else [value]
    with pytest.raises(SystemExit) as e:
        settings_from_args(["-d", TARGET, "--sources", "1", flag, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and needle in err and "Traceback" not in err, err


def test_bad_worker_count_in_the_environment_names_the_variable(monkeypatch, capsys):
    from nnunet_sar.pretraining.cli import settings_from_args
    monkeypatch.setenv("nnUNet_n_proc_DA", "two")
    with pytest.raises(SystemExit) as e:
        settings_from_args(["-d", TARGET, "--sources", "1", "-device", "cpu"])
    assert e.value.code == 2 and "nnUNet_n_proc_DA='two'" in capsys.readouterr().err


def test_resuming_or_validating_a_fold_does_not_need_the_pretraining_file(tiny_plans, tmp_path, monkeypatch):
    """nnUNetv2_train --c and --val load the fold's own checkpoint through nnU-Net's load_checkpoint, which first
    calls initialize(): the fold's weights replace every pre-trained one, so the pre-training file may have moved
    since the fold began (before, initialize() looked for it again and stopped). A new fold still needs it."""
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import CHECKPOINT_ENV
    pre = str(tmp_path / "pre.pth")
    _checkpoint_for(tiny_plans, "nnUNetPlans", "3d_fullres", pre)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv(CHECKPOINT_ENV, pre)
    trainer = _sar_trainer()
    trainer.initialize()
    with torch.no_grad():  # a fold's weights: neither the pre-trained ones nor a fresh initialisation
        for p in trainer.network.parameters():
            p.add_(0.5)
    fold_checkpoint = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(fold_checkpoint)
    os.remove(pre)
    resumed = _sar_trainer()
    resumed.load_checkpoint(fold_checkpoint)  # what nnU-Net's maybe_load_checkpoint does for --c and --val
    mine = resumed.network.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in trainer.network.state_dict().items())
    with pytest.raises(SARError, match="pre.pth"):
        _sar_trainer().initialize()
