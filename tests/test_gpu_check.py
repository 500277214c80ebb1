"""``nnunet_sar_benchmark --gpu-check``: its CPU form end to end (every path named, pass where the CPU can run
it, ``skipped (needs CUDA)`` where it cannot, the figures consistent), and the device-side corruption branch
(``transform_batch``, what ``SARPretrainer._step`` runs under ``--transform-on device``) on CPU tensors."""
import json
import math
import os

import pytest
import torch
from conftest import exe, run

from nnunet_sar.commands import gpu_check

CPU_PASS = ["demo", "pretrain_steps.corruptions_on_device_in_step", "pretrain_steps.grad_scaler_branch_cpu",
            "checkpoint_cpu_only", "resume_bit_identical", "corruption_statistics", "ddp_torchrun_1proc_gloo",
            "throughput", "finetune_overhead"]
CPU_NEEDS_CUDA = ["pretrain_steps.amp_autocast_fp16",
                  "pretrain_steps.grad_scaler_cuda", "ddp_nccl", "throughput.amp_on", "throughput.peak_gpu_memory"]


@pytest.mark.slow
def test_cpu_form_of_the_gpu_check(gpu_check_cpu):
    done, res = gpu_check_cpu["done"], gpu_check_cpu["result"]
    assert res is not None, (done.stdout[-3000:], done.stderr[-3000:])
    status = {e["path"]: e["status"] for e in res["entries"]}
    assert done.returncode == 0, (status, done.stdout[-3000:], done.stderr[-3000:])
    with open(os.path.join(gpu_check_cpu["root"], "check.txt")) as f:
        check_cpu_form_result(res, f.read())


def check_cpu_form_result(res: dict, text: str):
    """Every entry and figure of a CPU-form result (also usable on a kept gpu_check_cpu.json)."""
    status = {e["path"]: e["status"] for e in res["entries"]}
    assert status == {**{p: "pass" for p in CPU_PASS}, **{p: gpu_check.NEEDS_CUDA for p in CPU_NEEDS_CUDA}}
    fig = {e["path"]: e["figures"] for e in res["entries"]}

    assert fig["demo"]["checkpoint"] and set(fig["demo"]["test_dice"]) == {"nnUNetTrainerSAR_check"}
    steps = fig["pretrain_steps.corruptions_on_device_in_step"]
    assert steps["steps"] == gpu_check.SIZES["cpu"]["steps"] and steps["max_weight_change"] > 0
    assert all(math.isfinite(v) for v in steps["total_loss"])
    scales = fig["pretrain_steps.grad_scaler_branch_cpu"]["grad_scale"]
    assert len(scales) == steps["steps"] and all(1 <= s <= 2 ** 24 for s in scales)
    assert fig["pretrain_steps.grad_scaler_branch_cpu"]["scale_range"] == [min(scales), max(scales)]
    assert fig["checkpoint_cpu_only"]["tensor_devices"] == ["cpu"] and not fig["checkpoint_cpu_only"]["cuda_available"]
    assert fig["checkpoint_cpu_only"]["loaded_equal"] and fig["checkpoint_cpu_only"]["n_weights"] > 10
    assert fig["resume_bit_identical"]["differing"] == [] and len(fig["resume_bit_identical"]["val_loss"]) == 2
    stats = fig["corruption_statistics"]
    assert stats["all_within_bounds"] and all(stats["checks"].values()) and len(stats["checks"]) == 28
    ddp = fig["ddp_torchrun_1proc_gloo"]
    assert ddp["ddp_active"] and ddp["bitwise_equal"] and ddp["max_abs_weight_diff"] == 0.0

    tp = fig["throughput"]
    sizes = gpu_check.SIZES["cpu"]
    assert {(r["patch"], r["batch"]) for r in tp["rows"]} >= {("paper cube", b) for b in sizes["batches"]}
    for r in tp["rows"]:
        assert r["amp"] is False and r["step_s"] > 0
        assert r["cubes_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        assert r["steps_per_s"] == pytest.approx(1 / r["step_s"])
        assert set(r["loader_cubes_per_s"]) == {str(w) for w in sizes["workers"]}
        assert r["bottleneck"] == ("loader" if max(r["loader_cubes_per_s"].values()) < r["cubes_per_s"] else "step")
    same_plan = [r for r in tp["rows"] if r["patch"] == "plan patch" and r["batch"] == tp["ratio_batch"]]
    assert len(same_plan) == 1 and same_plan[0]["size"] == tp["ratio_patch"]
    assert tp["sar_over_nnunet_step"] == pytest.approx(same_plan[0]["step_s"] / tp["nnunet_step_s"])
    ft = fig["finetune_overhead"]
    assert ft["iterations_per_epoch"] == 250 and ft["plain_step_s"] == tp["nnunet_step_s"]
    assert ft["sar_epoch_s"] == pytest.approx(250 * ft["sar_step_s"])
    assert ft["overhead_per_epoch_s"] == pytest.approx(ft["sar_epoch_s"] - ft["plain_epoch_s"])

    for path, s in status.items():
        assert any(line.startswith(path) and s in line for line in text.splitlines()), (path, text)
    assert res["summary"] == f"{len(CPU_PASS)} pass, 0 fail, {len(CPU_NEEDS_CUDA)} {gpu_check.NEEDS_CUDA}"


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = run([exe("nnunet_sar_benchmark"), "--gpu-check", "-device", "cuda", "--json", str(tmp_path / "x.json")],
               check=False)
    assert done.returncode != 0 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------- the device branch on CPU tensors
def test_corruption_statistics_on_cpu_tensors_within_bounds():
    res = gpu_check.corruption_statistics("cpu", 120, [24, 24, 24], seed=11)
    failed = [k for k, v in res["checks"].items() if not v]
    assert not failed, (failed, res["paths"])
    assert res["expected"]["flip"] == pytest.approx(0.368)  # 0.4 * 0.6 + 0.16 * 0.6 * 2/3 + 0.064
    assert set(res["paths"]) == {"transform_batch on cpu", "per cube on cpu"} and len(res["checks"]) == 28
    for path in res["paths"]:
        c = res["paths"][path]["counts"]
        assert 0 < c["outpaint"] < c["paint"] and 0 < c["inverted"] < c["nonlinear"]


def test_corruption_observations_catch_broken_corruptions():
    """The statistics would fail a broken device path: flips applied to the input only, a shuffle that is no
    permutation, noise outside [0, 1)."""
    clean = gpu_check._distinct_cube((8, 10, 12), 0)
    flipped = torch.flip(clean, [2])
    assert gpu_check.observe("flip", clean, flipped, flipped)["alike"]
    broken = gpu_check.observe("flip", clean, flipped, clean)  # the target not flipped with the input
    assert not broken["alike"] and not broken["flipped"]
    dup = clean.clone()
    dup.view(-1)[:2] = dup.view(-1)[2]  # two voxels duplicated: not a permutation
    assert not gpu_check.observe("shuffle", clean, dup, clean)["permutation"]
    assert gpu_check.observe("shuffle", clean, clean.flip(1), clean)["permutation"]
    painted = clean.clone()
    painted[0, 3:6, 3:6, 3:6] = 2.0
    o = gpu_check.observe("paint", clean, painted, clean)
    assert o["applied"] and not o["outpaint"] and o["max"] == 2.0 and o["noise_n"] == 27
    inverted = 1 - clean
    assert gpu_check.observe("nonlinear", clean, inverted, clean)["inverted"]
    assert not gpu_check.observe("nonlinear", clean, clean ** 2, clean)["inverted"]


def test_rate_bounds_reject_a_wrong_rate():
    assert gpu_check._rate_ok(50, 100, 0.5) and not gpu_check._rate_ok(80, 100, 0.5)
    assert gpu_check._two_ok(50, 55, 100) and not gpu_check._two_ok(20, 80, 100)
    assert gpu_check.net_flip_rate(0.0) == 0.0 and gpu_check.net_flip_rate(1.0, 1) == 1.0
    assert gpu_check.net_flip_rate(1.0, 2) == pytest.approx(2 / 3)  # two flips cancel when the axes agree (1/3)


def test_amp_off_disables_autocast_and_restores_the_loop_module():
    import nnunet_sar.pretraining.loop as loop

    class T:
        grad_scaler = "scaler"
    t = T()
    with gpu_check.amp_off(t):
        assert t.grad_scaler is None
        with loop.torch.autocast("cpu", enabled=True):
            assert not torch.is_autocast_enabled("cpu")
        assert loop.torch.zeros(2).shape == (2,)  # everything else is torch
    assert loop.torch is torch and t.grad_scaler == "scaler"


def test_checkpoint_optimizer_state_goes_to_the_cpu():
    """What the loop saves must load without a GPU (nnU-Net reads -pretrained_weights without map_location)."""
    from nnunet_sar.pretraining.loop import _on_cpu
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.rand(4, 3)).sum().backward()
    opt.step()
    state = _on_cpu(opt.state_dict())
    assert state["param_groups"] == opt.state_dict()["param_groups"]
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(state["state"][k]["momentum_buffer"], v["momentum_buffer"])
        assert state["state"][k]["momentum_buffer"].device.type == "cpu"
    opt2 = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(state)
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert _on_cpu({"a": [torch.ones(1), (2, "x")]})["a"][1] == (2, "x")


def test_table_names_every_path():
    res = {"device": "cpu", "machine": "m", "date": "d", "seconds": 1.0, "summary": "s", "entries": [
        {"path": "demo", "status": "pass", "detail": "", "figures": {"seconds": 2.5}},
        {"path": "ddp_nccl", "status": gpu_check.NEEDS_CUDA, "detail": "", "figures": {}},
        {"path": "throughput", "status": "fail", "detail": "", "figures": {"rows": [
            {"patch": "plan patch", "size": [8, 8, 8], "batch": 2, "amp": False, "step_s": 0.5, "steps_per_s": 2.0,
             "cubes_per_s": 4.0, "loader_cubes_per_s": {"0": 3.0}, "bottleneck": "loader"},
            {"patch": "plan patch", "size": [8, 8, 8], "batch": 64, "amp": True, "oom": True,
             "loader_cubes_per_s": {"0": 3.0}}], "nnunet_step_s": 0.25, "sar_over_nnunet_step": 2.0}}]}
    text = gpu_check.table(res)
    assert "demo" in text and "ddp_nccl" in text and gpu_check.NEEDS_CUDA in text and "fail" in text
    assert "OOM" in text and "loader" in text and "SAR step / nnU-Net step 2.00" in text
