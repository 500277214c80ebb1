"""Where SAR checkpoints live, how they are written, and how they are loaded with verification.

A pre-training run for dataset D, plans P, configuration C and variant V writes, like an nnU-Net
training, into ``$nnUNet_results/D/nnUNetSARPretrain_V__P__C/``. Its ``checkpoint_final.pth`` is in
the format of nnU-Net's ``-pretrained_weights``: ``{'network_weights': state_dict on CPU, ...}``
with every key of the nnU-Net network, plus the heads and the run's settings under other keys.

Loading never fails silently (a known trap of Models Genesis + nnU-Net): every tensor of the target
network except the seg layers must be present with the same shape, and all differences are named.
"""
import os
from os.path import isfile, join

import torch
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

import nnunetv2.paths
from nnunet_sar import SARError, one_line

PRETRAIN_PREFIX = "nnUNetSARPretrain"
CHECKPOINT_ENV = "nnUNet_SAR_checkpoint"  # a file that nnUNetTrainerSAR* loads instead of the default
SKIP_ON_TRANSFER = (".seg_layers.",)     # as nnU-Net: restoration output != segmentation output


def pretrain_folder_name(variant: str, plans_identifier: str, configuration: str) -> str:
    return f"{PRETRAIN_PREFIX}_{variant}__{plans_identifier}__{configuration}"


def pretrain_output_folder(dataset_name: str, variant: str, plans_identifier: str, configuration: str) -> str:
    if not nnunetv2.paths.nnUNet_results:
        raise SARError("nnUNet_results is not set: export it as for nnU-Net itself")
    return join(nnunetv2.paths.nnUNet_results, dataset_name,
                pretrain_folder_name(variant, plans_identifier, configuration))


def find_pretrained_checkpoint(dataset_name: str, variant: str, plans_identifier: str, configuration: str) -> str:
    """The checkpoint a fine-tuning trainer starts from: $nnUNet_SAR_checkpoint if set, else the
    final checkpoint of the matching pre-training run (not checkpoint_best: see ``SARPretrainer.handed_on``).
    Says how to make it when it is missing."""
    override = os.environ.get(CHECKPOINT_ENV)
    if override:
        if not isfile(override):
            raise SARError(f"{CHECKPOINT_ENV}={override} does not exist")
        return override
    fname = join(pretrain_output_folder(dataset_name, variant, plans_identifier, configuration), "checkpoint_final.pth")
    if not isfile(fname):
        raise SARError(
            f"no SAR pre-training checkpoint {fname}. Make it with: nnunet_sar_pretrain -d {dataset_name} "
            f"-p {plans_identifier} -c {configuration} --variant {variant} --sources SRC [SRC ...] "
            f"(or point {CHECKPOINT_ENV} at a checkpoint file)")
    return fname


def atomic_save(obj, fname: str) -> None:
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over `fname`: a kill
    (or a full disk, or a power cut) at any moment leaves either the previous complete file or the new one.
    A failed save removes its temporary file and raises SARError naming `fname`; the previous file stays."""
    tmp = f"{fname}.tmp{os.getpid()}"
    _remove_stale_temp_files(fname)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the checkpoint
        os.replace(tmp, fname)
        _fsync_folder(os.path.dirname(os.path.abspath(fname)))
    except OSError as e:
        raise SARError(f"cannot write checkpoint {fname}: {e.strerror or one_line(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale_temp_files(fname: str) -> None:
    """Temporary files of `fname` left by a process killed while saving (kill -9, OOM killer): removed
    once that process is gone, so that they do not pile up in the output folder."""
    folder, base = os.path.split(os.path.abspath(fname))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        pid = name[len(base) + 4:] if name.startswith(base + ".tmp") else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that process still runs (it may be saving right now)
        except ProcessLookupError:
            pass
        except OSError:  # PermissionError: alive, another user's
            continue
        try:
            os.remove(join(folder, name))
        except OSError:
            pass


def _fsync_folder(folder: str) -> None:
    """Makes a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)



def cpu_state_dict(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in unwrap(module).state_dict().items()}


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP and torch.compile wrappers."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
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


def transferable_mismatches(network: torch.nn.Module, weights: dict) -> list[str]:
    """Every key of `network` (seg layers excepted) missing from `weights` or of another shape."""
    problems = []
    for key, value in unwrap(network).state_dict().items():
        if any(s in key for s in SKIP_ON_TRANSFER):
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


def load_pretrained_into(network: torch.nn.Module, fname: str, log=print, parts: str = "all") -> int:
    """Copies the pre-trained tensors from a SAR (or any nnU-Net) checkpoint into `network`, after checking
    all of them: every tensor but the seg layers (``parts='all'``), or the encoder's alone (``'encoder'``;
    the decoder keeps nnU-Net's initialisation). A single-channel checkpoint serves a C-channel target
    (first kernel repeated, scaled by 1/C). Returns the number of tensors loaded."""
    if parts not in TRANSFER_PARTS:
        raise SARError(f"unknown transfer parts {parts!r}; choose from {', '.join(TRANSFER_PARTS)}")
    ckpt = load_checkpoint_file(fname)
    from nnunet_sar.finetuning import adapt_input_channels  # here: nnunet_sar.finetuning imports this module
    weights, adapted = adapt_input_channels(ckpt["network_weights"], network)
    if adapted:
        log(f"SAR: single-channel checkpoint: {', '.join(adapted)} repeated over the input channels and scaled by 1/C")
    problems = transferable_mismatches(network, weights)
    if problems:
        settings = ckpt.get("settings", {})
        made_for = f" (it was made for {settings.get('dataset_name')} / {settings.get('plans_identifier')} / " \
                   f"{settings.get('configuration')})" if settings else ""
        raise SARError(f"checkpoint {fname} does not fit this network{made_for}; {len(problems)} differences: "
                       + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
    module = unwrap(network)
    state = module.state_dict()
    wanted = encoder_keys(module) if parts == "encoder" else set(state)
    transfer = {k: v for k, v in weights.items()
                if k in state and k in wanted and not any(s in k for s in SKIP_ON_TRANSFER)}
    state.update(transfer)
    module.load_state_dict(state)
    return len(transfer)
