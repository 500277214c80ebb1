"""A term that keeps the encoder's features spread over many directions (an experiment of the transfer issue).

Measured on the phantoms (BENCHMARKS.md, "Longer and faster pre-training"): the more the U-Net is
pre-trained, the fewer directions its encoder's features use (the effective rank of stage 1's 64 channels:
36.8 at initialisation, 21.9 after 670 steps, 4.3 after 30 steps at the paper's lr 1), and nnU-Net then
fine-tunes a faint, textured tumour worse in the same order. The term penalises that collapse on each
encoder stage's output (what the decoder reads), over a strided sample of the batch's voxels: the inverse
participation ratio of the channels' covariance Sigma,

    L_dec = mean over stages of  tr(Sigma^2) / tr(Sigma)^2

1 when the features use one direction, 1/C when the C channels are uncorrelated with equal variance. A
covariance, not a correlation (VICReg's and Barlow Twins' terms): a few channels of large variance crowd
out the others for a fresh decoder as much as correlated ones do. ``--sar-decorrelation W`` adds W * L_dec
to the U-Net's loss."""
import torch

MAX_VOXELS = 4096  # per stage: enough for the covariance of C <= 320 channels, cheap beside the step


def channel_covariance(features: torch.Tensor, max_voxels: int = MAX_VOXELS) -> torch.Tensor:
    """(B, C, *spatial) -> the C x C covariance of the channels over the batch's voxels (a strided sample)."""
    x = features.float().transpose(0, 1).flatten(1)  # (C, N)
    x = x[:, ::max(1, x.shape[1] // max_voxels)]
    x = x - x.mean(1, keepdim=True)
    return x @ x.T / x.shape[1]


def decorrelation_loss(skips: list[torch.Tensor]) -> torch.Tensor:
    """L_dec over the encoder's stage outputs: the mean inverse participation ratio of their covariances."""
    terms = []
    for s in skips:
        cov = channel_covariance(s)
        terms.append(cov.pow(2).sum() / torch.diagonal(cov).sum().pow(2).clamp_min(1e-12))
    return torch.stack(terms).mean()
