"""nnunet-sar: Scale-Aware Restoration (SAR) self-supervised pre-training for nnU-Net v2.

Map of the package (one module per concept of the paper):
- ``network``     the U-Net exactly as nnU-Net builds it from a dataset's plans
- ``heads``       scale head S (2.2) and modality discriminator M with gradient reversal (2.3)
- ``checkpoint``  where SAR checkpoints live and how they are written and verified on load
- ``portable``    one pre-training for many targets (moved plans), the weights_only export with nnssl's adaptation plan
- ``phantoms``    synthetic CT / MRI datasets with tumors of three sizes (demo and tests)
- ``pretraining`` sources (3.1), cubes (2.2), corruptions (2.1), the objectives (``pretraining/objectives``:
  sar 2.4, genesis, mae, rot, rpl, jigsaw, cpc), the loop that runs any of them, the transfer check, CLI
- ``commands``    what uses all of the above and nothing imports: ``demo`` (the whole workflow on phantoms),
  ``report``, ``benchmark`` (with ``transfer_benchmark`` and ``gpu_check``), ``datasets`` (converters, splits)

Shared here: ``SARError`` and its one-line form, ``nnunet_folder`` (nnU-Net's folders, failing the same way
everywhere) and ``console_main`` (every command's error handling).
"""
import functools
import os
import sys

__version__ = "0.1.0"


class SARError(Exception):
    """An error a user can fix: the message names the file, key or value and what to do."""


def one_line(e: BaseException) -> str:
    """An exception's text on one line: readers (SimpleITK) and nnU-Net put newlines into theirs."""
    return " ".join(str(e).split())


NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def nnunet_folder(name: str) -> str:
    """$nnUNet_raw, $nnUNet_preprocessed or $nnUNet_results, read when asked (as nnU-Net's own paths); a
    SARError naming the variable when it is not set (never a silent fall-back to the current folder)."""
    if name not in NNUNET_FOLDERS:
        raise ValueError(f"not an nnU-Net folder: {name!r}")
    path = os.environ.get(name)
    if not path:
        raise SARError(f"{name} is not set: export it as for nnU-Net itself")
    return path


def console_main(prog: str):
    """Decorates a command's ``main``: a SARError (a mistake the user can fix) becomes one line
    ``PROG: error: ...`` on stderr and exit status 2, as argparse's own errors; anything else is a bug and
    keeps its traceback."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except SARError as e:
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                sys.exit(2)
        return run
    return wrap
