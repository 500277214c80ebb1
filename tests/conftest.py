"""Test session set-up: nnU-Net's folders in a fresh temporary directory (set before nnunetv2 is
imported, because nnunetv2.paths reads them at import), CPU-friendly nnU-Net settings, and one small
planned phantom target plus two phantom sources shared by the end-to-end tests."""
import os
import shutil
import subprocess
import sys
import tempfile
from os.path import join

import pytest

_ROOT = tempfile.mkdtemp(prefix="nnunet_sar_tests_")
for _k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ[_k] = join(_ROOT, _k)
    os.makedirs(os.environ[_k], exist_ok=True)
os.environ.update({"nnUNet_compile": "0", "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "2", "OMP_NUM_THREADS": "2"})
os.environ.pop("nnUNet_SAR_checkpoint", None)

PLANNING_ENV = {**os.environ, "nnUNet_n_proc_DA": "1"}  # nnU-Net's planner crashes with 0 threads
TARGET_ID, TARGET = 801, "Dataset801_SARTestTumor"
SOURCE_IDS = (802, 803)  # CT, MRI


def exe(name: str) -> str:
    """A console script installed next to the test interpreter."""
    return join(os.path.dirname(sys.executable), name)


def run(cmd: list, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} exited {done.returncode}\nstdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="session")
def nnunet_folders():
    return {k: os.environ[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


@pytest.fixture(scope="session")
def planned_target(nnunet_folders):
    """A planned and preprocessed MRI tumor target (6 + 2 test cases of 32^3) and CT + MRI sources."""
    from nnunet_sar.phantoms import write_phantom_dataset
    raw = nnunet_folders["nnUNet_raw"]
    write_phantom_dataset(raw, TARGET_ID, "SARTestTumor", "MRI", num_training=6, num_test=2, shape=(32, 32, 32), seed=3)
    write_phantom_dataset(raw, SOURCE_IDS[0], "SARTestCT", "CT", num_training=4, shape=(24, 32, 32),
                          spacing=(1.5, 1.0, 1.0), seed=7)
    write_phantom_dataset(raw, SOURCE_IDS[1], "SARTestMRI", "MRI", num_training=4, shape=(32, 32, 32), seed=8)
    run([exe("nnUNetv2_plan_and_preprocess"), "-d", str(TARGET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"], env=PLANNING_ENV)
    return TARGET


@pytest.fixture(scope="session")
def pretrained(planned_target):
    """A brief SAR pre-training run through the real console script; returns its output folder."""
    run([exe("nnunet_sar_pretrain"), "-d", str(TARGET_ID), "--sources", *map(str, SOURCE_IDS), "--epochs", "2",
         "--iters-per-epoch", "3", "-device", "cpu"])
    from nnunet_sar.checkpoint import pretrain_output_folder
    return pretrain_output_folder(TARGET, "sar", "nnUNetPlans", "3d_fullres")


@pytest.fixture(scope="session")
def gpu_check_cpu():
    """``nnunet_sar_benchmark --gpu-check -device cpu``, its work kept: the check's result, and the tiny demo's
    nnU-Net folders (plan -> pre-train -> nnUNetv2_train -> predict -> evaluate, all as commands) for the
    end-to-end test, so CI runs that chain once."""
    import json
    root = join(_ROOT, "gpu_check")
    done = run([exe("nnunet_sar_benchmark"), "--gpu-check", "-device", "cpu", "--keep", root,
                "--json", join(root, "check.json")], check=False)
    res = None
    if os.path.isfile(join(root, "check.json")):
        with open(join(root, "check.json")) as f:
            res = json.load(f)
    return {"done": done, "result": res, "root": root}


@pytest.fixture(scope="session")
def tiny_plans(planned_target):
    """nnU-Net's plans for the target with 8..64 features per stage: a tiny network for CPU learning tests."""
    import json
    folder = join(os.environ["nnUNet_preprocessed"], TARGET)
    plans = json.load(open(join(folder, "nnUNetPlans.json")))
    plans["plans_name"] = "nnUNetPlansTiny"
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64]
    json.dump(plans, open(join(folder, "nnUNetPlansTiny.json"), "w"))
    return "nnUNetPlansTiny"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_ROOT, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes of CPU training; `pytest -m 'not slow'` is the fast subset")
    if config.option.durations is None:  # the suite's time is a budget (about 15 minutes): show where it goes
        config.option.durations = 15
