"""Encoders cut into blocks, by name (``ENCODERS``): VGG-6/8 (`vgg`), ResNet-18/50 (`resnet`), SCFF's CNN
(`scff`), GIM's patch ResNet (`gim_resnet`); any encoder run per patch (`patches`)."""
from localssl.models import scff  # noqa: F401  (registers scff-cifar)
from localssl.models.blocks import BlockEncoder, scale_channels, split_into_blocks
from localssl.models.gim_resnet import GIMResNetOptions
from localssl.models.patches import PatchedEncoder, PatchEncoderOptions, patchify
from localssl.models.preprocessing import Preprocessing
from localssl.models.registry import (
    ENCODER_OPTIONS,
    ENCODERS,
    EncoderOptions,
    build_encoder,
    encoder_options,
    register_encoder,
    resolve_encoder_options,
)
from localssl.models.resnet import ResNetOptions
from localssl.models.vgg import DEFAULT_GRIDS, default_grids, fit_grid, grid_choices

__all__ = ["BlockEncoder", "split_into_blocks", "scale_channels", "ENCODERS", "ENCODER_OPTIONS", "EncoderOptions",
           "Preprocessing", "ResNetOptions", "GIMResNetOptions", "PatchedEncoder", "PatchEncoderOptions", "patchify",
           "register_encoder", "encoder_options", "resolve_encoder_options",
           "DEFAULT_GRIDS", "build_encoder", "default_grids", "fit_grid", "grid_choices"]
