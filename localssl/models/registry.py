"""The encoder registry: names, each encoder's typed options, and `build_encoder`.

An encoder registers its factory ``(width, in_channels[, options]) -> BlockEncoder``
next to its code with `register_encoder`; one that has options of its own
(ResNet's stem and cut, `localssl.models.resnet`) names their dataclass there.
Options come from YAML (``encoder_options: {stem: cifar}``) or the command line
(``--encoder-opt stem=cifar``) as a mapping, and are checked against that
dataclass: an unknown key lists the valid ones, a value of the wrong type names
its key (the same checks as every config, `localssl.config.from_dict`), and an
encoder without options refuses any. This keeps encoder-specific fields out of
`TrainConfig`, as a rule keeps its options out of the engine (STYLE principle 11).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from localssl.config import ConfigError, from_dict
from localssl.models.blocks import BlockEncoder
from localssl.registry import Registry

ENCODERS: Registry = Registry("encoder")

#: Encoder name -> the dataclass of its options; an encoder absent here takes none.
ENCODER_OPTIONS: dict[str, type[EncoderOptions]] = {}


@dataclass
class EncoderOptions:
    """Base of an encoder's options: one small dataclass per encoder."""

    def resolved(self, image_size: int | None) -> EncoderOptions:
        """These options with every choice that depends on the input size made (``image_size``: its side in px).

        A run saves them resolved, so that its weights load again without the data.
        """
        return self


def register_encoder(name: str, options: type[EncoderOptions] | None = None) -> Callable:
    """Decorator: register an encoder factory under ``name``, with the dataclass of its ``options``."""

    def deco(factory: Callable) -> Callable:
        ENCODERS.register(name)(factory)
        if options is not None:
            ENCODER_OPTIONS[name] = options
        return factory

    return deco


def encoder_options(name: str, options: Mapping[str, Any] | EncoderOptions | None = None) -> EncoderOptions | None:
    """The typed options of encoder ``name`` from a mapping (None for an encoder that takes none)."""
    ENCODERS.get(name)  # an unknown name lists the valid ones
    cls = ENCODER_OPTIONS.get(name)
    if isinstance(options, EncoderOptions):
        if cls is None or not isinstance(options, cls):
            raise ConfigError(f"encoder {name!r} takes {cls.__name__ if cls else 'no options'}, "
                              f"got {type(options).__name__}")
        return options
    given = dict(options or {})
    if cls is None:
        if given:
            raise ConfigError(f"encoder {name!r} takes no encoder_options, got {', '.join(map(repr, sorted(given)))}")
        return None
    try:
        return from_dict(cls, given)
    except ConfigError as e:
        raise ConfigError(f"encoder_options of {name}: {e}") from None


def resolve_encoder_options(
    name: str, options: Mapping[str, Any] | None, image_size: int | None
) -> dict[str, Any] | None:
    """Every option of encoder ``name`` as a run uses it at ``image_size`` px (what `localssl train` saves)."""
    opts = encoder_options(name, options)
    return None if opts is None else asdict(opts.resolved(image_size))


def build_encoder(
    name: str,
    width: float = 1.0,
    in_channels: int = 3,
    options: Mapping[str, Any] | EncoderOptions | None = None,
    image_size: int | None = None,
) -> BlockEncoder:
    """Build a registered encoder by name (unknown names list the valid ones).

    ``options``: the encoder's own options (a mapping or its dataclass);
    ``image_size``: the input side in px, for options that depend on it
    (ResNet's ``stem: auto``).
    """
    factory = ENCODERS.get(name)
    opts = encoder_options(name, options)
    if opts is None:
        return factory(width=width, in_channels=in_channels)
    return factory(width=width, in_channels=in_channels, options=opts.resolved(image_size))
