"""The two heads SAR adds on the encoder of nnU-Net's U-Net.

- ``ScaleHead`` S (paper 2.2): global average pooling + 2 fully connected layers on the bottleneck,
  predicting the crop scale (large / medium / small). It pools the mean and the standard deviation of
  each channel: with the plans' instance norm the spatial spread of a feature map is what still tells a
  blurred, enlarged 1/8 crop from a sharp 1/2 crop.
- Both heads read the encoder's features *before* their norm (``model.PreNormFeatures``): instance norm
  standardises every channel of every cube, erasing the statistics that global pooling reads.
- ``ModalityDiscriminator`` M, MIAL (paper 2.3): conv layers + global average pooling + 2 fully
  connected layers. Dense taps: the features of every encoder stage enter M at the layer of matching
  resolution (concatenated with M's own features), not only the bottleneck; one conv layer per stage
  (the paper's 3 for its U-Net). The first stage matters most: with the plans' instance norm, only its
  first convolution before the norm still carries each cube's intensities, the plainest modality cue (M
  as a probe, 3 seeds, the learning test's run: 0.89 / 0.90 / 0.78 held-out accuracy; 0.65 / 0.61 /
  0.61 with stage 0's last convolution tapped, 0.56 / 0.58 / 0.52 with the last three stages only).
- ``GradientReversal``: how the min-max game of Eq. 3 is played. M minimises the cross-entropy of
  the modality (= maximises the log-likelihood of Eq. 3); the encoder receives the negated gradient,
  so it maximises that same cross-entropy. One forward/backward pass updates both players
  simultaneously (gradient descent-ascent on exactly Eq. 3), which is cheaper than alternating
  updates (no second pass through M) and keeps a single optimizer step per iteration.
"""
import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from torch import nn


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by -weight backward."""

    @staticmethod
    def forward(ctx, x, weight: float):
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, weight)


def mean_and_std_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, 2C): every channel's spatial mean and log standard deviation (the log: a
    feature map before an instance norm has no set scale, and ratios of spread are what tell scales apart)."""
    flat = x.flatten(2).float()
    return torch.cat((flat.mean(-1), torch.log(flat.std(-1) + 1e-3)), 1)


class ScaleHead(nn.Module):
    """S: global (mean, std) pooling + FC + ReLU + FC -> scale logits."""

    def __init__(self, in_channels: int, num_scales: int = 3, hidden: int = 256):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(2 * in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_scales))

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.fc(mean_and_std_pool(bottleneck))


class ModalityDiscriminator(nn.Module):
    """M (MIAL): conv_i sees [M's previous features, encoder tap i] at the tap's resolution.

    The stride of conv_i is the encoder's stride into tap i+1, so M's features land on the next tap's
    grid. M's own norm is batch norm on the statistics of the batch (no running averages, as Models
    Genesis' ContBatchNorm3d): M is never transferred, and its pooled features must keep what tells the
    cubes of one batch apart, whatever norm the U-Net uses.
    """

    def __init__(self, encoder, num_modalities: int = 2, width: int = 64, hidden: int = 256):
        super().__init__()
        self.taps = list(range(len(encoder.output_channels)))  # every stage
        conv_op = encoder.conv_op
        norm_op = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d}.get(conv_op, nn.BatchNorm3d)
        blocks, prev = [], 0
        for i, stage in enumerate(self.taps):
            stride = encoder.strides[self.taps[i + 1]] if i + 1 < len(self.taps) else 1
            blocks.append(ConvDropoutNormReLU(
                conv_op, prev + encoder.output_channels[stage], width, 3, stride, conv_bias=True,
                norm_op=norm_op, norm_op_kwargs={"eps": 1e-5, "affine": True, "track_running_stats": False},
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}))
            prev = width
        self.convs = nn.ModuleList(blocks)
        self.fc = nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(inplace=True), nn.Linear(hidden, num_modalities))

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = None
        for conv, stage in zip(self.convs, self.taps):
            tap = skips[stage]
            x = conv(tap if x is None else torch.cat((x, tap), 1))
        return self.fc(x.flatten(2).mean(-1))
