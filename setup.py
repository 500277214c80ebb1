"""nnunet-sar: Scale-Aware Restoration (SAR) pre-training as an nnU-Net v2 plugin.

Three source folders, three import names:
- ``nnunet_sar/``   -> ``nnunet_sar``              (network from plans, heads, checkpoints, phantoms; commands/)
- ``pretraining/``  -> ``nnunet_sar.pretraining``  (sources, cubes, corruptions, objectives, loop, CLI)
- ``trainers/``     -> ``nnunetv2.training.nnUNetTrainer.nnunet_sar``

nnU-Net finds trainers by scanning the physical folder ``nnunetv2/training/nnUNetTrainer`` (it has no
entry points), so a regular ``pip install .`` places the trainers there; pip's uninstall removes them
again. An editable install cannot place files there: point ``nnUNet_extTrainer`` at ``trainers/``.
"""
from setuptools import setup

setup(
    name="nnunet-sar",
    version="0.1.0",
    description="Scale-Aware Restoration (SAR) self-supervised pre-training for nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["nnunet_sar", "nnunet_sar.commands", "nnunet_sar.pretraining", "nnunet_sar.pretraining.objectives",
              "nnunetv2.training.nnUNetTrainer.nnunet_sar"],
    package_dir={
        "nnunet_sar": "nnunet_sar",
        "nnunet_sar.pretraining": "pretraining",
        "nnunet_sar.pretraining.objectives": "pretraining/objectives",
        "nnunetv2.training.nnUNetTrainer.nnunet_sar": "trainers",
    },
    install_requires=[
        "nnunetv2>=2.8.0",  # nnUNet_extTrainer and the 2.7+ build_network_architecture signature
        "torch>=2.1",
        "batchgenerators>=0.25",
        "batchgeneratorsv2>=0.3",
        "SimpleITK>=2.2",
        "numpy>=1.24",
        "acvl-utils>=0.2",
        "matplotlib>=3.5",
        "tqdm>=4.60",
        "scipy>=1.7",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={
        "console_scripts": [
            "nnunet_sar_pretrain=nnunet_sar.pretraining.cli:main",
            "nnunet_sar_demo=nnunet_sar.commands.demo:main",
            "nnunet_sar_benchmark=nnunet_sar.commands.benchmark:main",
            "nnunet_sar_convert_brats2018=nnunet_sar.commands.datasets:main_convert_brats2018",
            "nnunet_sar_convert_source=nnunet_sar.commands.datasets:main_convert_source",
            "nnunet_sar_split=nnunet_sar.commands.datasets:main_split",
            "nnunet_sar_report=nnunet_sar.commands.report:main",
            "nnunet_sar_check_transfer=nnunet_sar.pretraining.transfer_check:main",
            "nnunet_sar_export=nnunet_sar.portable:main_export",
            "nnunet_sar_use_pretraining=nnunet_sar.portable:main_use_pretraining",
        ]
    },
)
