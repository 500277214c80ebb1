"""Distributed pre-training: 2 processes with the gloo backend on the CPU, started like nnU-Net's -num_gpus."""
import os
from os.path import join

import pytest
import torch
from conftest import SOURCE_IDS, TARGET, exe, run

pytestmark = pytest.mark.slow  # two pre-training processes through the console script


def test_two_process_ddp_pretraining(tiny_plans, tmp_path):
    env = {**os.environ, "nnUNet_results": str(tmp_path)}
    run([exe("nnunet_sar_pretrain"), "-d", TARGET, "-p", tiny_plans, "--sources", *map(str, SOURCE_IDS),
         "--epochs", "2", "--iters-per-epoch", "2", "--batch-size", "2", "-device", "cpu", "-num_gpus", "2"], env=env)
    out = join(tmp_path, TARGET, f"nnUNetSARPretrain_sar__{tiny_plans}__3d_fullres")
    logs = [f for f in os.listdir(out) if f.startswith("training_log")]
    assert len(logs) == 1  # one rank writes logs and checkpoints
    text = open(join(out, logs[0])).read()
    assert "weights identical on all 2 ranks" in text
    assert text.count("epoch 2/2") == 1
    ckpt = torch.load(join(out, "checkpoint_final.pth"), weights_only=False)
    assert not any(k.startswith("module.") for k in ckpt["network_weights"])
    assert ckpt["current_epoch"] == 2
