"""nnUNetTrainer subclasses that fine-tune from SAR pre-training.

Installed as ``nnunetv2.training.nnUNetTrainer.nnunet_sar`` so that nnU-Net's own trainer lookup
(``-tr nnUNetTrainerSAR`` in nnUNetv2_train and nnUNetv2_predict) finds them.
"""
