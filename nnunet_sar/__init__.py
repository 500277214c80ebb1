"""nnunet-sar: Scale-Aware Restoration (SAR) self-supervised pre-training for nnU-Net v2.

Map of the package (one module per concept of the paper):
- ``network``     the U-Net exactly as nnU-Net builds it from a dataset's plans
- ``heads``       scale head S (2.2) and modality discriminator M with gradient reversal (2.3)
- ``checkpoint``  where SAR checkpoints live and how they are written and verified on load
- ``portable``    one pre-training for many targets (moved plans), the weights_only export with nnssl's adaptation plan
- ``phantoms``    synthetic CT / MRI datasets with tumors of three sizes (demo and tests)
- ``demo``        ``nnunet_sar_demo``: the whole workflow on phantoms
- ``pretraining`` sources (3.1), cubes (2.2), corruptions (2.1), objective (2.4), loop, CLI
"""

__version__ = "0.1.0"


class SARError(Exception):
    """An error a user can fix: the message names the file, key or value and what to do."""


def one_line(e: BaseException) -> str:
    """An exception's text on one line: readers (SimpleITK) and nnU-Net put newlines into theirs."""
    return " ".join(str(e).split())
