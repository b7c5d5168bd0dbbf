"""Data: ``ImageDataModule`` (DALI | torchvision | memory | synthetic), folder checks, ``prepare``.

Imports are lazy so ``resnet-lamb prepare`` does not pay for Lightning or DALI.
"""

from __future__ import annotations

__all__ = ["ImageDataModule", "validate_root", "epoch_plan"]


def __getattr__(name):
    if name == "ImageDataModule":
        from resnet_lamb.data.datamodule import ImageDataModule

        return ImageDataModule
    if name == "validate_root":
        from resnet_lamb.data.folder import validate_root

        return validate_root
    if name == "epoch_plan":
        from resnet_lamb.data.sampling import epoch_plan

        return epoch_plan
    raise AttributeError(f"module 'resnet_lamb.data' has no attribute {name!r}")
