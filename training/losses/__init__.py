"""Training objectives, one module per family (named as in `training.registry.FAMILIES`).

Each module provides `training_losses(model, batch) -> {"loss": tensor, ...}` (what the loop
back-propagates; the other entries are logged) and `validation_metrics(model, batch) -> {name: float}`.
"""
