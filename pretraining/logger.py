"""nnU-Net's LocalLogger with whatever terms the objective returns, and a progress.png in nnU-Net's style."""
import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402


class SARLogger(LocalLogger):
    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        self.my_fantastic_logging = {k: [] for k in ("val_loss", "epoch_start_timestamps", "epoch_end_timestamps")}

    def log(self, key, value, epoch: int):
        if key not in self.my_fantastic_logging:  # every objective logs its own terms
            self.my_fantastic_logging[key] = []
        super().log(key, value, epoch)

    def plot_progress_png(self, output_folder: str, title: str = "pre-training"):
        """Every loss term (train and val), every accuracy, the learning rates and the epoch durations, one
        panel each; the terms are whatever the objective returned (``train_<term>``, ``val_<term>``)."""
        log = self.my_fantastic_logging
        x = np.arange(len(log["val_loss"]))
        terms = [k for k in log if k.startswith(("train_", "val_")) and k != "val_loss"]
        fig, axes = plt.subplots(4, 1, figsize=(12, 20))
        for ax, keys, ylabel, logy in (
                (axes[0], [k for k in terms if not k.endswith("_acc")], "loss", True),
                (axes[1], [k for k in terms if k.endswith("_acc")], "accuracy", False),
                (axes[2], [k for k in log if k.startswith("lr_") and log[k]], "learning rate", True)):
            for k in keys:
                y = np.asarray(log.get(k, []), dtype=float)[:len(x)]
                if len(y) and np.isfinite(y).any():
                    ax.plot(x[:len(y)], y, ls="--" if k.startswith("val") else "-", label=k, linewidth=2)
            ax.set_xlabel("epoch"), ax.set_ylabel(ylabel)
            if logy and ax.lines and all(np.nanmin(line.get_ydata()) > 0 for line in ax.lines):
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(loc="best")
        durations = np.subtract(log["epoch_end_timestamps"], log["epoch_start_timestamps"])[:len(x)]
        axes[3].plot(x[:len(durations)], durations, label="epoch duration", linewidth=2)
        axes[3].set_xlabel("epoch"), axes[3].set_ylabel("time [s]"), axes[3].legend(loc="best")
        axes[0].set_title(f"{title}: loss terms (train solid, val dashed)")
        plt.tight_layout()
        fig.savefig(f"{output_folder}/progress.png")
        plt.close(fig)
