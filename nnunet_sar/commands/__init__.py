"""The commands that use the core (``nnunet_sar`` and ``nnunet_sar.pretraining``) and that nothing in the
core imports: ``demo`` (nnunet_sar_demo), ``benchmark`` (nnunet_sar_benchmark, with ``transfer_benchmark``
and ``gpu_check`` behind its --transfer and --gpu-check), ``report`` (nnunet_sar_report) and ``datasets``
(the converters and splits of the paper's tasks)."""
