"""The network comes from the plans, checkpoints load verified, nnU-Net finds the trainers."""
import os
from os.path import join

import pytest
import torch
from conftest import PLANNING_ENV, TARGET, TARGET_ID, exe, run


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _trainer(name, plans="nnUNetPlans"):
    """The trainer exactly as nnUNetv2_train makes it (nnU-Net's lookup by name included)."""
    from nnunetv2.run.run_training import get_trainer_from_args
    return get_trainer_from_args(TARGET, "3d_fullres", 0, name, plans, device=torch.device("cpu"))


def test_nnunet_lookup_finds_the_trainers():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    for name in ("nnUNetTrainerSAR", "nnUNetTrainerSAR_demo", "nnUNetTrainer_demo"):
        cls = recursive_find_trainer_class_by_name(name)
        assert cls.__name__ == name and issubclass(cls, nnUNetTrainer)
    assert recursive_find_trainer_class_by_name("nnUNetTrainerSAR").pretraining_variant == "sar"


@pytest.mark.parametrize("planner,plans", [(None, "nnUNetPlans"), ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans")])
def test_network_equals_the_one_nnunet_trainer_builds(planned_target, planner, plans):
    from nnunet_sar.network import build_pretraining_network, build_target_network, load_plans, nnunet_weights
    if planner:
        run([exe("nnUNetv2_plan_experiment"), "-d", str(TARGET_ID), "-pl", planner], env=PLANNING_ENV)
    trainer = _trainer("nnUNetTrainer", plans)
    trainer.initialize()
    pm, cm, dj = load_plans(TARGET, plans)
    ours = build_target_network(pm, cm, dj)
    assert type(ours) is type(trainer.network)
    assert _shapes(ours) == _shapes(trainer.network)
    expected_class = "ResidualEncoderUNet" if planner else "PlainConvUNet"
    assert type(ours).__name__ == expected_class
    for norm in ("batch", "instance"):  # batch norm as the paper's pre-training (3.3), instance norm as the plans say
        pre = _shapes(build_pretraining_network(pm, cm, 1, norm=norm))
        pre = nnunet_weights(pre) if norm == "batch" else pre
        assert pre.keys() == _shapes(ours).keys()
        differ = {k for k in pre if pre[k] != _shapes(ours)[k]}
        assert differ and all(".seg_layers." in k for k in differ)  # restoration: 1 output instead of 2 classes
        assert pre["decoder.seg_layers.0.weight"][0] == 1
    norms = {type(m).__name__ for m in build_pretraining_network(pm, cm, 1).modules()}
    assert "InstanceNorm3d" in norms and "BatchNorm3d" not in norms  # the default: the plans' own norm
    norms = {type(m).__name__ for m in build_pretraining_network(pm, cm, 1, norm="batch").modules()}
    assert "BatchNorm3d" in norms and "InstanceNorm3d" not in norms


def test_missing_plans_names_the_nnunet_command():
    from nnunet_sar import SARError
    from nnunet_sar.network import load_plans
    os.makedirs(join(os.environ["nnUNet_preprocessed"], "Dataset809_NoPlans"), exist_ok=True)
    with pytest.raises(SARError, match="nnUNetv2_plan_and_preprocess -d 809"):
        load_plans(809)


@pytest.mark.slow  # needs the pre-training run of the `pretrained` fixture
def test_pretraining_checkpoint_has_nnunet_format(pretrained):
    from nnunet_sar.network import build_target_network, load_plans
    ckpt = torch.load(join(pretrained, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    net = build_target_network(*load_plans(TARGET))
    assert set(ckpt["network_weights"]) == set(net.state_dict())
    assert all(v.device.type == "cpu" for v in ckpt["network_weights"].values())
    assert {"scale_head", "discriminator", "settings"} <= set(ckpt)
    assert ckpt["settings"]["modalities"] == ["CT", "MRI"] and ckpt["settings"]["variant"] == "sar"
    for f in ("checkpoint_best.pth", "checkpoint_latest.pth", "progress.png", "settings.json"):
        assert os.path.isfile(join(pretrained, f)), f
    # nnU-Net's own -pretrained_weights loader accepts the file (the same call nnUNetv2_train makes)
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    load_pretrained_weights(net, join(pretrained, "checkpoint_final.pth"))
    key = "encoder.stages.0.0.convs.0.conv.weight"
    assert torch.equal(net.state_dict()[key], ckpt["network_weights"][key])


@pytest.mark.slow  # needs the pre-training run of the `pretrained` fixture
@pytest.mark.parametrize("name", ["nnUNetTrainerSAR", "nnUNetTrainerSAR_fullTransfer"])
def test_sar_trainer_starts_from_the_pretrained_weights(pretrained, name):
    """The default transfers the encoder (the decoder keeps nnU-Net's initialisation); _fullTransfer every
    tensor but the seg layers. Every other tensor is exactly the checkpoint's; all stay trainable."""
    from nnunet_sar.checkpoint import encoder_keys
    ckpt = torch.load(join(pretrained, "checkpoint_final.pth"), map_location="cpu", weights_only=False)["network_weights"]
    trainer = _trainer(name)
    trainer.initialize()
    state = trainer.network.state_dict()
    encoder = encoder_keys(trainer.network)
    compared = 0
    for k, v in state.items():
        if ".seg_layers." in k or (name == "nnUNetTrainerSAR" and k not in encoder):
            assert v.shape != ckpt[k].shape or not torch.equal(v, ckpt[k]) or v.ndim == 1, k  # fresh (norm 1/0 aside)
            continue
        assert torch.equal(v, ckpt[k]), k
        compared += 1
    assert compared > (20 if name == "nnUNetTrainerSAR" else 50)
    assert all(p.requires_grad for p in trainer.network.parameters())
    with open(trainer.log_file) as f:
        assert f"loaded {compared} pre-trained tensors" in f.read()


def test_sar_trainer_without_checkpoint_says_how_to_make_one(planned_target):
    from nnunet_sar import SARError
    trainer = _trainer("nnUNetTrainerSAR")
    trainer.pretraining_variant = "scale8"  # a variant never pre-trained here
    with pytest.raises(SARError, match="nnunet_sar_pretrain -d Dataset801_SARTestTumor .*--variant scale8"):
        trainer.initialize()


@pytest.mark.slow  # needs the pre-training run of the `pretrained` fixture
def test_checkpoint_of_other_plans_names_the_differences(pretrained, tmp_path):
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import load_pretrained_into
    from nnunet_sar.network import build_target_network, load_plans
    ckpt = torch.load(join(pretrained, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    w = ckpt["network_weights"]
    w["encoder.stages.1.0.convs.0.conv.weight"] = torch.zeros(3, 3, 3, 3, 3)
    del w["decoder.transpconvs.0.weight"]
    bad = str(tmp_path / "bad.pth")
    torch.save(ckpt, bad)
    with pytest.raises(SARError) as e:
        load_pretrained_into(build_target_network(*load_plans(TARGET)), bad)
    msg = str(e.value)
    assert "encoder.stages.1.0.convs.0.conv.weight: checkpoint (3, 3, 3, 3, 3)" in msg
    assert "missing decoder.transpconvs.0.weight" in msg and "2 differences" in msg


def test_checkpoint_file_that_is_not_one(tmp_path):
    from nnunet_sar import SARError
    from nnunet_sar.checkpoint import load_checkpoint_file
    f = tmp_path / "junk.pth"
    f.write_bytes(b"not a checkpoint")
    with pytest.raises(SARError, match="junk.pth"):
        load_checkpoint_file(str(f))


def test_unwrap_finds_the_module_under_torch_compile():
    """unwrap looks torch._dynamo up instead of importing it (1.6 s of every command's start): a compiled
    network (nnU-Net's nnUNet_compile=1) must still be saved and loaded as the bare module."""
    from nnunet_sar.checkpoint import cpu_state_dict, unwrap
    net = torch.nn.Conv3d(1, 2, 3)
    compiled = torch.compile(net)  # wraps only; nothing compiles until it is called
    assert unwrap(compiled) is net and unwrap(net) is net
    assert set(cpu_state_dict(compiled)) == {"weight", "bias"}  # not "_orig_mod.weight"
