"""nnunet_sar_benchmark at toy sizes: both pipelines make valid cubes, the summary line has the agreed
format, the memory helpers read the right lines in the right unit. The one timing assertion is a wide
margin (ours faster than the plain-loop reference at all; it is > 10x at real sizes), measured interleaved
so that machine load hits both sides."""
import json
import os
import re

import numpy as np
import pytest
import torch

from nnunet_sar.commands import benchmark

TOY_PATCH = (32, 32, 16)  # Models Genesis' reference code needs sides >= 16 (its boxes keep 3 voxels off the faces)


def test_reference_and_ours_make_cubes_in_unit_range(tmp_path):
    volumes = benchmark.write_volumes(str(tmp_path), 2, shape=(40, 40, 36))
    ds = benchmark.our_cubes(volumes, TOY_PATCH)
    for i in range(6):
        item = ds[i]
        for key in ("image", "target"):
            assert tuple(item[key].shape) == (1, *TOY_PATCH) and item[key].dtype == torch.float32
            assert 0.0 <= float(item[key].min()) and float(item[key].max()) <= 1.0
    pairs = list(benchmark.reference_cubes(volumes, TOY_PATCH, 6))
    assert len(pairs) == 6
    for x, y in pairs:
        for a in (x, y):
            assert a.shape == (1, *TOY_PATCH) and a.dtype == np.float32
            assert 0.0 <= a.min() and a.max() <= 1.0
    assert any(not np.array_equal(x, y) for x, y in pairs)  # the reference corrupts

    ours, ref = benchmark.throughput(volumes, TOY_PATCH, n_ours=8, n_ref=2, rounds=2)
    assert ours > 1.5 * ref, (ours, ref)  # a regression to a python loop per voxel box would fail this


def test_reference_corruptions_each_keep_shape_and_range():
    ref = benchmark.ReferenceGenesis(seed=3, local_rate=1.0, nonlinear_rate=1.0)
    cube = np.random.RandomState(0).rand(1, *TOY_PATCH).astype(np.float32)
    shuffled = ref.local_pixel_shuffling(cube)
    assert shuffled.shape == cube.shape and not np.array_equal(shuffled, cube)
    for out in (ref.nonlinear_transformation(cube), ref.in_painting(cube), ref.out_painting(cube)):
        assert out.shape == cube.shape and 0.0 <= out.min() and out.max() <= 1.0


def test_summary_line_format():
    line = benchmark.summary_line(12.345, 9.96)
    assert line == "speedup 64x64x32: 12.3x 128^3: 10.0x"
    assert re.fullmatch(r"speedup 64x64x32: \d+\.\dx 128\^3: \d+\.\dx", line)


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_memory_helpers_read_the_peak_in_mib(tmp_path):
    before = _status_kb("VmHWM")
    mib = benchmark.vm_hwm_mb()
    after = _status_kb("VmHWM")
    assert before <= mib * 1024 <= after  # the peak, in MiB (a kB / MB mix-up or another line would fail)
    assert abs(benchmark.vm_hwm_mb("VmRSS") * 1024 - _status_kb("VmRSS")) < 64 * 1024  # another field by name

    benchmark.write_volumes(str(tmp_path), 3, shape=(24, 24, 24))
    fields = benchmark.peak_rss_mb(str(tmp_path), 3, patch=TOY_PATCH, fields=True)
    # the peak of the child is at least what it held at the end, and a process that imported torch holds > 50 MiB
    assert fields["VmHWM"] >= fields["RssAnon"] + fields["RssFile"] - 1
    assert 50 < fields["VmHWM"] < 64 * 1024
    assert fields["RssFile"] > 0  # the memory-mapped volumes and libraries are file-backed


def test_transfer_benchmark_checkpoint_arm_refuses_a_missing_or_other_file(tmp_path, capsys, monkeypatch):
    """sar_checkpoint fine-tunes one given run in every repeat: without the file it stops in one line before
    making any target (minutes), and a working folder keeps the rows of one checkpoint only."""
    from nnunet_sar.commands import transfer_benchmark as tb
    monkeypatch.setattr(tb, "prepare", lambda *a: pytest.fail("targets made before the arguments were checked"))
    before = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for extra in ([], ["--checkpoint", str(tmp_path / "none.pth")]):
        with pytest.raises(SystemExit) as e:
            tb.main(["--arms", "sar_checkpoint", "-o", str(tmp_path / "w"), *extra])
        assert e.value.code == 2 and "needs --checkpoint FILE" in capsys.readouterr().err
    mine, other = tmp_path / "mine.pth", tmp_path / "other.pth"
    mine.write_bytes(b"x"), other.write_bytes(b"x")
    (tmp_path / "w").mkdir()
    json.dump({"checkpoint": str(mine)}, open(tmp_path / "w" / "transfer_benchmark.json", "w"))
    with pytest.raises(SystemExit) as e:
        tb.main(["--arms", "sar_checkpoint", "--checkpoint", str(other), "-o", str(tmp_path / "w")])
    assert e.value.code == 2 and f"holds sar_checkpoint rows of {mine}" in capsys.readouterr().err
    assert {k: os.environ.get(k) for k in before} == before  # the tests' nnU-Net folders untouched


def test_transfer_benchmark_pairs_its_arms_continues_and_exits_zero(tmp_path, capsys, monkeypatch):
    """The console script's loop with its minutes-long steps replaced: every arm of a repeat is fine-tuned with
    that repeat's seed (the pairing), one pre-training per repeat and key, ``-device`` reaches both steps, a rerun
    in the same folder continues instead of redoing (and refuses another ``--finetune-epochs``, whose runs would
    mix with these), and ``main`` returns None: the console script did
    ``sys.exit(results)``, exit status 1 after a successful run, with the whole results dict on stderr."""
    from nnunet_sar.commands import benchmark, transfer_benchmark as tb
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # main points them at its folder
        monkeypatch.setenv(k, os.environ[k])
    calls = []
    monkeypatch.setattr(tb, "prepare", lambda root, targets, env, log: {t: f"Dataset9{i:02d}_{t}" for i, t in enumerate(targets)})
    monkeypatch.setattr(tb, "pretrain", lambda first, key, r, env, log, device: calls.append(("pretrain", key, r, device))
                        or f"/x/{key}_{r}.pth")

    def finetune(target, trainer, checkpoint, env, log, seed=None, device="cpu", epochs=3):
        assert epochs == 5
        calls.append(("finetune", target, trainer, checkpoint, seed, device))
        return {"test_dice": seed / 10000, "pseudo_dice_per_epoch": [0.1, 0.2, 0.3]}
    monkeypatch.setattr(tb, "finetune_and_score", finetune)
    argv = ["--transfer", "--arms", "scratch", "sar", "--targets", "demo", "faint", "--repeats", "2", "-o", str(tmp_path),
            "-device", "cuda", "--finetune-epochs", "5"]
    assert benchmark.main(argv) is None
    assert [c for c in calls if c[0] == "pretrain"] == [("pretrain", "sar_instance", 0, "cuda"),
                                                        ("pretrain", "sar_instance", 1, "cuda")]
    tuned = [c for c in calls if c[0] == "finetune"]
    assert len(tuned) == 8 and {c[4] for c in tuned[:4]} == {2000} and {c[4] for c in tuned[4:]} == {2001}
    assert ("finetune", "Dataset900_demo", "nnUNetTrainerSAR_demo", "/x/sar_instance_1.pth", 2001, "cuda") in tuned
    assert ("finetune", "Dataset901_faint", "nnUNetTrainer_demo", None, 2000, "cuda") in tuned
    res = json.load(open(tmp_path / "transfer_benchmark.json"))
    assert [r["test_dice"] for r in res["faint"]["sar"]] == [0.2, 0.2001]
    assert "| sar | 0.200 +- 0.000" in capsys.readouterr().out
    calls.clear()
    assert benchmark.main(argv) is None and calls == []  # everything was done: the rerun only prints the table
    with pytest.raises(SystemExit):
        benchmark.main(argv[:-1] + ["6"])
    assert "holds runs of 5 fine-tuning epochs" in capsys.readouterr().err and calls == []


def test_transfer_benchmark_fresh_draw_is_nnunets_initialisation_at_its_seed(planned_target, tmp_path):
    """The scratch_otherDraw arm's checkpoint: nnU-Net's own initialisation of the target's network at the repeat's
    seed, which the SAR path loads (encoder only); one seed repeats it, another draws other weights."""
    import torch
    from nnunet_sar.checkpoint import encoder_keys, transferable_weights
    from nnunet_sar.commands import transfer_benchmark as tb
    from nnunet_sar.network import build_target_network, load_plans
    a, b, c = (tb.fresh_draw(planned_target, seed, str(tmp_path / name)) for seed, name in
               ((3000, "a"), (3000, "b"), (3001, "c")))
    network = build_target_network(*load_plans(planned_target, "nnUNetPlans", "3d_fullres"))
    wa, wb, wc = (transferable_weights(network, f, log=lambda *x: None, parts="encoder") for f in (a, b, c))
    assert set(wa) == encoder_keys(network)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and not all(torch.equal(wa[k], wc[k]) for k in wa)
