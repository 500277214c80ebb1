"""The pre-training network (paper Fig. 2): nnU-Net's U-Net E-D for the target plans, the scale
head S on the bottleneck and the modality discriminator M on dense encoder taps."""
import torch
from torch import nn

from nnunet_sar.heads import ModalityDiscriminator, ScaleHead, reverse_gradient


class PreNormFeatures:
    """Encoder features *before* a norm, captured by forward hooks: the first stage's first convolution,
    every other stage's last one.

    The heads read these rather than the stage outputs: nnU-Net's instance norm standardises every
    channel of every cube, so after it the global statistics that S and M pool are nearly constant.
    Before the norm they still carry the cube's texture and spread, and the gradient of the heads still
    reaches the encoder through the same convolutions. Only the first convolution, linear in the cube,
    still carries its intensity scale and level, the plainest modality cue: every later one reads
    features its predecessor's instance norm made blind to the scale (and to the level but for the zero
    padding at the cube's border). M as a probe, the learning test's run, read 0.65 / 0.61 / 0.61
    held-out accuracy from the first stage's last convolution, 0.89 / 0.90 / 0.78 from its first (seeds
    12345, 1, 2). A stage without a norm gives its output."""

    def __init__(self, encoder: nn.Module):
        self.captured: dict[int, torch.Tensor] = {}
        norm_type = getattr(encoder, "norm_op", None)

        def norms(module: nn.Module) -> list[nn.Module]:
            return [m for m in module.modules() if norm_type is not None and isinstance(m, norm_type)]
        # the first convolution: ResEnc's stem where it works on stage 0's grid, else stage 0's first
        stem = getattr(encoder, "stem", None)
        first = norms(stem) if stem is not None and torch.as_tensor(encoder.strides[0]).eq(1).all() else []
        taps = {i: norms(stage)[-1:] for i, stage in enumerate(encoder.stages)}
        taps[0] = (first or norms(encoder.stages[0]))[:1]
        for i, found in taps.items():
            for norm in found:
                norm.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def store(module, inputs, output):
            self.captured[i] = inputs[0]
        return store

    def collect(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """The captured features of this forward pass (stage output where nothing was captured)."""
        feats = [self.captured.get(i, s) for i, s in enumerate(skips)]
        self.captured.clear()
        return feats


class SARNetwork(nn.Module):
    def __init__(self, unet: nn.Module, num_scales: int = 3, num_modalities: int = 2,
                 scale_head: bool = True, discriminator: bool = True):
        super().__init__()
        self.unet = unet
        self.features = PreNormFeatures(unet.encoder)
        self.scale_head = ScaleHead(unet.encoder.output_channels[-1], num_scales) if scale_head else None
        self.discriminator = ModalityDiscriminator(unet.encoder, num_modalities) if discriminator else None

    def forward(self, x: torch.Tensor, adv_weight: float = 1.0):
        """Returns (restoration logits, scale logits or None, modality logits or None). The encoder
        receives -adv_weight times M's gradient (adv_weight 0: M is a mere probe of the features)."""
        skips = self.unet.encoder(x)
        feats = self.features.collect(skips)
        restored = self.unet.decoder(skips)
        scale = self.scale_head(feats[-1]) if self.scale_head is not None else None
        modality = None
        if self.discriminator is not None:
            modality = self.discriminator([reverse_gradient(f, adv_weight) for f in feats])
        return restored, scale, modality
