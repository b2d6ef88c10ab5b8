"""Load the original projects' checkpoints into our families (fidelity against the fixtures).

`load_original(family, constructor_args, state_dict)` builds our model from the original
constructor arguments, maps the original state_dict keys, loads strictly and returns an eval-mode
module. Each family has a module here (named as in `training.registry.FAMILIES`) providing
`load_original(constructor_args, state_dict)` with its own key map; this function only dispatches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from training.registry import family_module


def load_original(family: str, constructor_args: dict[str, Any],
                  state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Our model of `family` (the fixture folder name) holding an original checkpoint, in eval mode."""
    model = family_module(family, "originals").load_original(constructor_args, state_dict)
    return model.eval()
