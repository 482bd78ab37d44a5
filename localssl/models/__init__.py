"""Encoders cut into blocks."""
from localssl.models.blocks import BlockEncoder, split_into_blocks
from localssl.models.vgg import DEFAULT_GRIDS, ENCODERS, build_encoder, default_grids, fit_grid, grid_choices

__all__ = ["BlockEncoder", "split_into_blocks", "ENCODERS", "DEFAULT_GRIDS", "build_encoder", "default_grids",
           "fit_grid", "grid_choices"]
