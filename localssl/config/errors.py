"""The config error and how a value is quoted in it: every config check of localssl raises `ConfigError`."""
from __future__ import annotations

import reprlib
from typing import Any


class ConfigError(ValueError):
    """A config key or value that cannot work; the message says what to change."""


# Values are quoted in error messages through this: a hostile or mistaken value (a 1 MB string, a YAML
# alias bomb whose full repr has billions of characters) must not turn one message into gigabytes.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 2


def shown(value: Any) -> str:
    """``repr(value)``, shortened for an error message."""
    return _REPR.repr(value)
