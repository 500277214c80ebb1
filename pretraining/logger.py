"""nnU-Net's LocalLogger with SAR's quantities, and a progress.png in nnU-Net's style."""
import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

TERMS = ("res", "scale", "adv")
LRS = ("lr_unet", "lr_scale_head", "lr_discriminator")


class SARLogger(LocalLogger):
    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        keys = [f"{p}_{k}" for p in ("train", "val") for k in TERMS + ("scale_acc", "adv_acc")]
        self.my_fantastic_logging = {k: [] for k in keys + ["val_loss", *LRS, "epoch_start_timestamps",
                                                            "epoch_end_timestamps"]}

    def log(self, key, value, epoch: int):
        if key not in self.my_fantastic_logging:  # a part without parameters, e.g. no discriminator
            self.my_fantastic_logging[key] = []
        super().log(key, value, epoch)

    def plot_progress_png(self, output_folder: str):
        """Every loss (res, scale, adv; train and val), the heads' accuracies, the learning rates and
        the epoch durations, one panel each."""
        log = self.my_fantastic_logging
        x = np.arange(len(log["val_loss"]))
        fig, axes = plt.subplots(4, 1, figsize=(12, 20))
        for ax, keys, ylabel, logy in (
                (axes[0], [f"{p}_{k}" for k in TERMS for p in ("train", "val")], "loss", True),
                (axes[1], ["train_scale_acc", "val_scale_acc", "train_adv_acc", "val_adv_acc"], "accuracy", False),
                (axes[2], [k for k in LRS if log.get(k)], "learning rate", True)):
            for k in keys:
                y = np.asarray(log.get(k, []), dtype=float)[:len(x)]
                if len(y) and np.isfinite(y).any():
                    ax.plot(x[:len(y)], y, ls="--" if k.startswith("val") else "-", label=k, linewidth=2)
            ax.set_xlabel("epoch"), ax.set_ylabel(ylabel)
            if logy and ax.lines:
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(loc="best")
        durations = np.subtract(log["epoch_end_timestamps"], log["epoch_start_timestamps"])[:len(x)]
        axes[3].plot(x[:len(durations)], durations, label="epoch duration", linewidth=2)
        axes[3].set_xlabel("epoch"), axes[3].set_ylabel("time [s]"), axes[3].legend(loc="best")
        axes[0].set_title("SAR pre-training: loss_res, loss_scale, loss_adv (train solid, val dashed)")
        plt.tight_layout()
        fig.savefig(f"{output_folder}/progress.png")
        plt.close(fig)
