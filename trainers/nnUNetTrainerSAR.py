"""nnUNetTrainerSAR: nnU-Net's default recipe, starting from the SAR checkpoint of its own dataset,
plans and configuration (made by ``nnunet_sar_pretrain -d D -p P -c C``). All layers stay trainable.
``nnUNet_SAR_checkpoint=FILE`` loads another checkpoint; plans moved from another dataset load the pre-training
they record (``nnunet_sar_use_pretraining``). The logic is in ``nnunet_sar.finetuning``."""
from nnunet_sar.finetuning import nnUNetTrainerSAR  # noqa: F401  (nnU-Net's lookup finds it here)
