"""The pre-training network (paper Fig. 2): nnU-Net's U-Net E-D for the target plans, the scale
head S on the bottleneck and the modality discriminator M on dense encoder taps."""
import torch
from torch import nn

from nnunet_sar.heads import ModalityDiscriminator, ScaleHead, reverse_gradient


class SARNetwork(nn.Module):
    def __init__(self, unet: nn.Module, num_scales: int = 3, num_modalities: int = 2,
                 scale_head: bool = True, discriminator: bool = True):
        super().__init__()
        self.unet = unet
        self.scale_head = ScaleHead(unet.encoder.output_channels[-1], num_scales) if scale_head else None
        self.discriminator = ModalityDiscriminator(unet.encoder, num_modalities) if discriminator else None

    def forward(self, x: torch.Tensor, adv_weight: float = 1.0):
        """Returns (restoration logits, scale logits or None, modality logits or None). The encoder
        receives -adv_weight times M's gradient (adv_weight 0: M is a mere probe of the features)."""
        skips = self.unet.encoder(x)
        restored = self.unet.decoder(skips)
        scale = self.scale_head(skips[-1]) if self.scale_head is not None else None
        modality = None
        if self.discriminator is not None:
            taps = {i: reverse_gradient(skips[i], adv_weight) for i in self.discriminator.taps}
            modality = self.discriminator([taps.get(i) for i in range(len(skips))])
        return restored, scale, modality
