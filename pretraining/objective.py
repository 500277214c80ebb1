"""Kept for imports of the former layout: SAR's objective is ``objectives/sar.py``."""
from nnunet_sar.pretraining.objectives.sar import VARIANTS, SARObjective, Variant, sar_terms  # noqa: F401
