"""Bits shared by the backends: normalisation constants, dtypes, the placeholder image, warnings."""

from __future__ import annotations

import io
import sys

import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    from resnet_lamb.errors import RecipeError

    try:
        return DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise RecipeError(f"data.dtype: {name!r} is not one of float32, bfloat16, float16") from None


def val_resize(image_size: int) -> int:
    """Shorter side before the centre crop: 256 for 224 (ImageNet's 256/224 ratio)."""
    return int(round(image_size * 256 / 224))


_PLACEHOLDER: bytes | None = None


def placeholder_jpeg() -> bytes:
    """A small valid grey JPEG that stands in for a corrupt file (its label is -1)."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (124, 116, 104)).save(buf, "JPEG")
        _PLACEHOLDER = buf.getvalue()
    return _PLACEHOLDER


def warn_corrupt(path: str, why: str) -> None:
    """One warning line for an image that does not decode. ``path``: a file, or ``<shard>::<member>``."""
    from resnet_lamb.data.shards import MEMBER_SEP

    if MEMBER_SEP in path:  # the shard itself opened (an unopenable shard stops the run instead)
        fix = "replace the image and pack the data again (resnet-lamb pack)"
    else:
        fix = "replace the file"
        try:  # only on a failure: tell an unreadable file (permissions) from a corrupt one
            with open(path, "rb"):
                pass
        except PermissionError:
            why, fix = "permission denied", "make it readable by this user (chmod a+r)"
        except OSError as err:
            why = err.strerror or why
    print(f"resnet-lamb: warning: {path}: corrupt or unreadable image ({why}); skipped for the rest "
          f"of the run (label -1); {fix}", file=sys.stderr, flush=True)
