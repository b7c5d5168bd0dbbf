"""Bits shared by the backends: the loader settings, normalisation constants, dtypes, the placeholder
image, warnings."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass

import torch

from resnet_lamb.data.sampling import plan_kwargs

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoaderSettings:
    """What every backend's loader takes from the data module, the same for both splits of a run: the
    batch geometry and this rank, the seed, the image format and the CPU work per rank. A loader adds
    its split's own: ``train``, the image count ``n`` and its callbacks."""

    global_batch: int
    micro_batch: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    image_size: int = 224
    workers: int = 0  # DALI CPU threads / DataLoader worker processes / decoding threads
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    prefetch: int = 2  # DALI prefetch_queue_depth / DataLoader prefetch_factor
    epoch_mode: str = "padded"

    @property
    def images_per_batch(self) -> int:
        """Images one micro-batch step takes across all ranks (:class:`EpochPosition`'s unit)."""
        return self.micro_batch * self.world_size

    def plan_kwargs(self, train: bool) -> dict:
        """:func:`resnet_lamb.data.sampling.epoch_plan`'s arguments for the training or validation split."""
        return plan_kwargs(
            train, self.global_batch, self.micro_batch, self.world_size, self.rank, self.seed, self.epoch_mode
        )


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
    print(
        f"resnet-lamb: warning: {path}: corrupt or unreadable image ({why}); skipped for the rest "
        f"of the run (label -1); {fix}",
        file=sys.stderr,
        flush=True,
    )


_M1, _M2, _GOLD = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def mix64(z):
    """SplitMix64's finaliser: a 64-bit hash, elementwise on numpy uint64 arrays (wrapping)."""
    import numpy as np

    z = np.asarray(z, dtype=np.uint64) + np.uint64(_GOLD)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def sample_key(seed: int, epoch: int):
    """The hash both training backends key a sample's augmentation on, before the file index."""
    import numpy as np

    return mix64(
        mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64)) ^ np.array([epoch & (2**64 - 1)], dtype=np.uint64)
    )


class BadFiles:
    """File indices of a split known to be corrupt, as a set (``add``, ``in``, iteration) over a flag
    per file kept in shared memory: DataLoader worker processes (forked or spawned) see each other's
    finds, so a bad file is decoded once per run, not once per worker. ``mask(indices)`` is the
    vectorised lookup."""

    def __init__(self, n: int):
        self._flags = torch.zeros(max(int(n), 1), dtype=torch.uint8).share_memory_()
        self._np = self._flags.numpy()

    def __getstate__(self):
        return {"flags": self._flags}  # torch.multiprocessing passes the shared storage itself

    def __setstate__(self, state):
        self._flags = state["flags"]
        self._np = self._flags.numpy()

    def add(self, i: int) -> None:
        self._np[int(i)] = 1

    def __contains__(self, i) -> bool:
        return bool(self._np[int(i)])

    def mask(self, indices):
        return self._np[indices].astype(bool)

    def __iter__(self):
        import numpy as np

        return iter(np.flatnonzero(self._np).tolist())

    def __len__(self) -> int:
        return int(self._np.sum())


class EpochPosition:
    """Lightning's stateful-loader protocol (``state_dict`` / ``load_state_dict``, stored in the
    checkpoint's fit-loop state): the epoch and the images of it the training loop has consumed
    (``images_per_batch`` = micro batch x world size per batch), so that a checkpoint written
    mid-epoch (a SIGUSR1/SIGTERM save) resumes at the next batch of the same permutation. Lightning
    does not prefetch from loaders that have a length, so every yielded batch was consumed.

    A loader calls :meth:`_begin` with the epoch it starts (the first batch to yield, 0 unless
    resuming into that epoch) and :meth:`_advance` per yielded batch."""

    images_per_batch = 1
    _position = (0, 0)  # (epoch, images consumed in it)
    _resume_at: tuple[int, int] | None = None

    def _begin(self, epoch: int) -> int:
        resume, self._resume_at = self._resume_at, None
        images = resume[1] if resume is not None and resume[0] == epoch else 0
        if images % self.images_per_batch:
            from resnet_lamb.errors import UserError

            raise UserError(
                f"ckpt_path: the checkpoint was written {images} images into epoch {epoch}, not a "
                f"whole number of batches of {self.images_per_batch} (micro batch x devices); resume "
                "it with the micro batch and device count it was written with"
            )
        self._position = (epoch, images)
        return images // self.images_per_batch

    def _advance(self) -> None:
        epoch, images = self._position
        self._position = (epoch, images + self.images_per_batch)

    def state_dict(self) -> dict:
        return {"epoch": int(self._position[0]), "images": int(self._position[1])}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = (int(state.get("epoch", 0)), int(state.get("images", 0)))
