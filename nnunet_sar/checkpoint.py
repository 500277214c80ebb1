"""Where SAR checkpoints live, how they are written, and how they are loaded with verification.

A pre-training run for dataset D, plans P, configuration C and variant V writes, like an nnU-Net
training, into ``$nnUNet_results/D/nnUNetSARPretrain_V__P__C/``. Its ``checkpoint_final.pth`` is in
the format of nnU-Net's ``-pretrained_weights``: ``{'network_weights': state_dict on CPU, ...}``
with every key of the nnU-Net network, plus the heads and the run's settings under other keys.

Another dataset's pre-training is found through the ``sar_pretrained_from`` record of plans moved from
it (``nnunet_sar.portable``); nnssl checkpoints load too (their adaptation plan names the encoder).

Loading never fails silently (a known trap of Models Genesis + nnU-Net): every tensor it loads (all of the
target network but the seg layers, or the encoder's) must be present with the same shape, and all
differences are named.
"""
import os
import sys
from os.path import isfile, join

import torch
from torch.nn.parallel import DistributedDataParallel

from nnunet_sar import SARError, nnunet_folder, one_line
from nnunet_sar.files import atomic_write

PRETRAIN_PREFIX = "nnUNetSARPretrain"
CHECKPOINT_ENV = "nnUNet_SAR_checkpoint"  # a file that nnUNetTrainerSAR* loads instead of the default
SKIP_ON_TRANSFER = (".seg_layers.",)     # as nnU-Net: restoration output != segmentation output


def pretrain_folder_name(variant: str, plans_identifier: str, configuration: str) -> str:
    return f"{PRETRAIN_PREFIX}_{variant}__{plans_identifier}__{configuration}"


def pretrain_output_folder(dataset_name: str, variant: str, plans_identifier: str, configuration: str) -> str:
    return join(nnunet_folder("nnUNet_results"), dataset_name,
                pretrain_folder_name(variant, plans_identifier, configuration))


PRETRAINED_FROM = "sar_pretrained_from"  # plans key: which pre-training a (moved) plans file fine-tunes from
NNSSL_PLAN = "nnssl_adaptation_plan"      # checkpoint key of nnssl (and of nnunet_sar_export)


def find_pretrained_checkpoint(dataset_name: str, variant: str, plans_identifier: str, configuration: str,
                               plans: dict | None = None) -> str:
    """The checkpoint a fine-tuning trainer starts from: $nnUNet_SAR_checkpoint if set, else the pre-training
    that the plans record under ``sar_pretrained_from`` (plans moved from the pre-training's dataset, see
    ``nnunet_sar.portable``), else the final checkpoint of the matching pre-training run of this dataset (not
    checkpoint_best: see ``SARPretrainer.handed_on``). Says how to make it when it is missing."""
    override = os.environ.get(CHECKPOINT_ENV)
    if override:
        if not isfile(override):
            raise SARError(f"{CHECKPOINT_ENV}={override} does not exist")
        return override
    pointer = (plans or {}).get(PRETRAINED_FROM)
    if pointer:
        return pointed_checkpoint(pointer, variant, f"{plans_identifier}.json of {dataset_name}")
    fname = join(pretrain_output_folder(dataset_name, variant, plans_identifier, configuration), "checkpoint_final.pth")
    if not isfile(fname):
        raise SARError(
            f"no SAR pre-training checkpoint {fname}. Make it with: nnunet_sar_pretrain -d {dataset_name} "
            f"-p {plans_identifier} -c {configuration} --variant {variant} --sources SRC [SRC ...] "
            f"(or point {CHECKPOINT_ENV} at a checkpoint file)")
    return fname


def pointed_checkpoint(pointer: dict, variant: str, where: str) -> str:
    """The file a ``sar_pretrained_from`` record names: {'checkpoint': FILE}, or the run of variant `variant`
    for {'dataset_name', 'plans_identifier', 'configuration'} (so each trainer finds its own variant's run)."""
    if not isinstance(pointer, dict) or not ("checkpoint" in pointer or "dataset_name" in pointer):
        raise SARError(f"{PRETRAINED_FROM} in {where} is {pointer!r}; write it with nnunet_sar_use_pretraining")
    if "checkpoint" in pointer:
        fname = pointer["checkpoint"]
        if not isfile(fname):
            raise SARError(f"{PRETRAINED_FROM} in {where} names {fname}, which does not exist")
        return fname
    source, plans_identifier, configuration = (pointer[k] for k in ("dataset_name", "plans_identifier", "configuration"))
    fname = join(pretrain_output_folder(source, variant, plans_identifier, configuration), "checkpoint_final.pth")
    if not isfile(fname):
        raise SARError(f"{PRETRAINED_FROM} in {where} points at {fname}, which does not exist. Make it with: "
                       f"nnunet_sar_pretrain -d {source} -p {plans_identifier} -c {configuration} --variant {variant} "
                       f"--sources SRC [SRC ...]")
    return fname


def atomic_save(obj, fname: str) -> None:
    """torch.save through ``nnunet_sar.files.atomic_write``: a kill (or a full disk, or a power cut) at any
    moment leaves either the previous complete file or the new one; a failed save raises SARError naming
    `fname` and leaves the previous file."""
    atomic_write(fname, lambda f: torch.save(obj, f), what="checkpoint ")


def cpu_state_dict(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in unwrap(module).state_dict().items()}


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP and torch.compile wrappers. torch._dynamo is looked up, not imported (1.6 s
    of every command's start): a compiled module exists only once torch.compile has imported it."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and isinstance(network, dynamo.OptimizedModule):
        network = network._orig_mod
    return network


def load_checkpoint_file(fname: str) -> dict:
    """Reads a checkpoint onto the CPU (also one saved on a GPU), with a clear error for a bad file."""
    try:
        ckpt = torch.load(fname, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise SARError(f"cannot read checkpoint {fname}: {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise SARError(f"{fname} is not an nnU-Net style checkpoint (no 'network_weights' key)")
    return ckpt


def transferable_mismatches(network: torch.nn.Module, weights: dict, keys=None) -> list[str]:
    """Every key of `network` (or of `keys`; seg layers excepted) missing from `weights` or of another shape."""
    problems = []
    for key, value in unwrap(network).state_dict().items():
        if any(s in key for s in SKIP_ON_TRANSFER) or (keys is not None and key not in keys):
            continue
        if key not in weights:
            problems.append(f"missing {key} {tuple(value.shape)}")
        elif weights[key].shape != value.shape:
            problems.append(f"shape {key}: checkpoint {tuple(weights[key].shape)} vs network {tuple(value.shape)}")
    return problems


TRANSFER_PARTS = ("all", "encoder")


def encoder_keys(network: torch.nn.Module) -> set[str]:
    """State-dict keys of the encoder (stem included), from the transfer surface the architecture declares
    (dynamic-network-architectures' ``key_to_encoder`` / ``key_to_stem``), with every alias of the same
    tensors (``decoder.encoder.*``)."""
    module = unwrap(network)
    prefixes = tuple(p + "." for p in (getattr(module, "key_to_encoder", "encoder"), getattr(module, "key_to_stem", None))
                     if p)
    state = module.state_dict()
    pointers = {v.data_ptr() for k, v in state.items() if k.startswith(prefixes)}
    return {k for k, v in state.items() if k.startswith(prefixes) or v.data_ptr() in pointers}


def made_for(ckpt: dict) -> tuple[str, str, str] | None:
    """(dataset, plans, configuration) a checkpoint was pre-trained for: our settings, else nnssl's pretrain_plan."""
    settings = ckpt.get("settings") or {}
    if settings.get("dataset_name"):
        return settings["dataset_name"], settings.get("plans_identifier"), settings.get("configuration")
    plan = (ckpt.get(NNSSL_PLAN) or {}).get("pretrain_plan") or {}
    if plan.get("dataset_name"):
        return plan["dataset_name"], plan.get("plans_name"), next(iter(plan.get("configurations") or {}), None)
    return None


def onto_network_keys(ckpt: dict, module: torch.nn.Module) -> dict:
    """The checkpoint's tensors under this network's keys: an nnssl file names its encoder (``key_to_encoder``
    of its adaptation plan), renamed to this network's where they differ; aliases of one tensor that the file
    lacks (``decoder.encoder.*`` in a file that stores the encoder once) are filled from the key it has."""
    weights = dict(ckpt["network_weights"])
    pt_key, key = (ckpt.get(NNSSL_PLAN) or {}).get("key_to_encoder"), getattr(module, "key_to_encoder", None)
    if pt_key and key and pt_key != key:
        weights = {(key + k[len(pt_key):] if k.startswith(pt_key + ".") else k): v for k, v in weights.items()}
    aliases = {}
    for k, v in module.state_dict().items():
        if v.numel():
            aliases.setdefault(v.data_ptr(), []).append(k)
    for keys in aliases.values():
        present = [k for k in keys if k in weights]
        for k in keys if present else ():
            weights.setdefault(k, weights[present[0]])
    return weights


def check_input_channels(network: torch.nn.Module, weights: dict, fname: str) -> None:
    """One line when the checkpoint reads another number of channels than the target and is not single-channel
    (which ``adapt_input_channels`` repeats over the target's channels)."""
    state = unwrap(network).state_dict()
    for key in first_conv_keys(network)[:1]:
        if key in weights and weights[key].ndim == state[key].ndim:
            c_pt, c = weights[key].shape[1], state[key].shape[1]
            if c_pt not in (1, c):
                raise SARError(f"checkpoint {fname} was pre-trained on {c_pt} input channels ({key}), this target has "
                               f"{c} (dataset.json channel_names): fine-tune a {c_pt}-channel target, or pre-train "
                               f"single-channel (nnunet_sar_pretrain does), which serves any number of channels")


def misfit_fix(ckpt: dict) -> str:
    """What to do when a checkpoint does not fit the target's network: fine-tune with the plans it was made for."""
    origin = made_for(ckpt)
    if origin is None:
        return "fine-tune with the plans the checkpoint was made for"
    dataset, plans, configuration = origin
    if ckpt.get("settings") is None:  # nnssl: its adaptation plan carries the architecture
        return (f"plan the target with the checkpoint's architecture_plans (mainline nnU-Net: "
                f"nnUNetv2_preprocess_like_nnssl), as {dataset} / {plans} was")
    moved = moved_plans_identifier(plans, dataset)
    return (f"fine-tune with the plans it was made for: nnUNetv2_move_plans_between_datasets -s {dataset} -t TARGET "
            f"-sp {plans} -tp {moved}, nnUNetv2_preprocess -d TARGET -plans_name {moved} -c {configuration}, "
            f"nnunet_sar_use_pretraining -d TARGET -p {moved} --from {dataset} -sp {plans} "
            f"(README: One pre-training, many targets)")


def moved_plans_identifier(plans_identifier: str, dataset_name: str) -> str:
    """The name the README gives plans moved from a pre-training's dataset: nnUNetPlans_from801."""
    return f"{plans_identifier}_from{dataset_name.split('_')[0].removeprefix('Dataset')}"


def transferable_weights(network: torch.nn.Module, fname: str, log=print, parts: str = "all") -> dict:
    """The pre-trained tensors of a SAR, nnssl or any nnU-Net checkpoint that `network` takes, after checking all
    of them: every tensor but the seg layers (``parts='all'``), or the encoder's alone (``'encoder'``; the decoder
    keeps nnU-Net's initialisation, and a checkpoint with another decoder, as nnssl's, still fits). A
    single-channel checkpoint serves a C-channel target (first kernel repeated, scaled by 1/C)."""
    if parts not in TRANSFER_PARTS:
        raise SARError(f"unknown transfer parts {parts!r}; choose from {', '.join(TRANSFER_PARTS)}")
    ckpt = load_checkpoint_file(fname)
    module = unwrap(network)
    trained = ckpt.get("trained_keys")
    encoder = encoder_keys(module)
    untrained = [k for k in module.state_dict() if k not in encoder and not any(s in k for s in SKIP_ON_TRANSFER)
                 and k not in set(trained or ())]
    if parts == "all" and trained is not None and untrained:
        raise SARError(f"checkpoint {fname} ({ckpt.get('objective')}) trained the encoder alone; its decoder is an "
                       f"untrained initialisation ({len(untrained)} tensors, e.g. {untrained[0]}): fine-tune with the encoder only (transfer_parts 'encoder', "
                       f"e.g. nnUNetTrainer{str(ckpt.get('objective', '')).capitalize()})")
    weights = onto_network_keys(ckpt, module)
    check_input_channels(module, weights, fname)
    weights, adapted = adapt_input_channels(weights, module)
    if adapted:
        log(f"SAR: single-channel checkpoint: {', '.join(adapted)} repeated over the input channels and scaled by 1/C")
    wanted = {k for k in (encoder_keys(module) if parts == "encoder" else module.state_dict())
              if not any(s in k for s in SKIP_ON_TRANSFER)}
    problems = transferable_mismatches(module, weights, wanted)
    if problems:
        origin = made_for(ckpt)
        raise SARError(f"checkpoint {fname} does not fit this network"
                       + (f" (it was made for {' / '.join(map(str, origin))})" if origin else "")
                       + f"; {len(problems)} differences: " + "; ".join(problems[:20])
                       + (" ..." if len(problems) > 20 else "") + f"; {misfit_fix(ckpt)}")
    return {k: weights[k] for k in wanted}


def load_pretrained_into(network: torch.nn.Module, fname: str, log=print, parts: str = "all") -> int:
    """Copies the checked tensors of ``transferable_weights`` into `network`; returns how many it loaded."""
    transfer = transferable_weights(network, fname, log, parts)
    module = unwrap(network)
    state = module.state_dict()
    state.update(transfer)
    module.load_state_dict(state)
    return len(transfer)


# ----------------------------------------------------------------------------- multi-channel targets
def first_conv_keys(network: torch.nn.Module) -> list[str]:
    """State-dict keys of the convolution weights that read the network's input channels: those the
    architecture declares (dynamic-network-architectures' ``keys_to_in_proj``), else the first convolution."""
    module = unwrap(network)
    state = module.state_dict()
    keys = [k + ".weight" for k in getattr(module, "keys_to_in_proj", None) or () if k + ".weight" in state][:1]
    for name, m in module.named_modules() if not keys else ():
        if isinstance(m, torch.nn.modules.conv._ConvNd) and not isinstance(
                m, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
            keys.append(name + ".weight")
            break
    # aliases of the same tensor (e.g. decoder.encoder.*, all_modules.*) appear under other names
    if keys:
        first = state[keys[0]]
        keys = [k for k, v in state.items() if k.endswith(".weight") and v.data_ptr() == first.data_ptr()]
    return keys


def adapt_input_channels(weights: dict, network: torch.nn.Module) -> tuple[dict, list[str]]:
    """A single-channel checkpoint for a network with C > 1 input channels: the first convolution's
    kernel is repeated over the C channels and scaled by 1/C (so a C-channel input of identical images
    gives the pre-trained response). Returns (new weights, adapted keys); other tensors are untouched,
    and weights that already fit (or do not come from a single channel) are returned unchanged."""
    state = unwrap(network).state_dict()
    weights = dict(weights)
    adapted = []
    for key in first_conv_keys(network):
        if key not in weights:
            continue
        w, target = weights[key], state[key]
        c = target.shape[1]
        if w.ndim == target.ndim and w.shape[1] == 1 and c > 1 and w.shape[0] == target.shape[0] \
                and w.shape[2:] == target.shape[2:]:
            weights[key] = w.repeat(1, c, *([1] * (w.ndim - 2))) / c
            adapted.append(key)
    return weights, adapted
