"""The check every ``from_torch`` makes of the module it is given."""

from __future__ import annotations

import torch


def check_source(cls: type, module: object, expected: type[torch.nn.Module]) -> None:
    """A TypeError naming the method and the module class it takes, unless ``module`` is one."""
    if not isinstance(module, expected):
        raise TypeError(
            f"fastarch.nn.{cls.__name__}.from_torch: module must be a torch.nn.{expected.__name__},"
            f" got {type(module).__name__}"
        )
