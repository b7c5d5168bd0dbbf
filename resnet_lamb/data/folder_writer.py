"""Writing a data set into the folder layout ``OUT/<split>/<class>/<name>.JPEG`` for ``resnet-lamb
prepare`` (:mod:`resnet_lamb.data.prepare`): each image written to a temporary name and renamed
into place, an image already there kept (an interrupted run resumes), counts kept per split and class.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from resnet_lamb.errors import DataError


class FolderWriter:
    def __init__(self, out: Path, size: int | None, quality: int = 95):
        self.out, self.size, self.quality = out, size, quality
        self.written = self.kept = 0
        self.counts = {"train": 0, "val": 0}
        self.classes: set[str] = set()

    def _target(self, split: str, cls: str, name: str) -> Path:
        self.counts[split] += 1
        self.classes.add(cls)
        d = self.out / split / cls
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def _atomic(self, path: Path, data: bytes):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self.written += 1

    def array(self, split: str, cls: str, name: str, image: np.ndarray):
        """Write a uint8 HxW or HxWx3 array as an RGB JPEG."""
        path = self._target(split, cls, name)
        if path.exists():
            self.kept += 1
            return
        from PIL import Image

        img = Image.fromarray(image).convert("RGB")
        self._atomic(path, self._encode(self._resize(img)))

    def jpeg(self, split: str, cls: str, name: str, data: bytes, source: str = ""):
        """Write JPEG bytes as they are (or re-encoded when --size is set)."""
        path = self._target(split, cls, name)
        if path.exists():
            self.kept += 1
            return
        if self.size:
            from PIL import Image

            try:
                img = Image.open(io.BytesIO(data)).convert("RGB")
            except Exception as err:  # noqa: BLE001
                raise DataError(f"{source or name}: not a readable image ({err})") from None
            data = self._encode(self._resize(img))
        self._atomic(path, data)

    def _resize(self, img):
        if not self.size:
            return img
        from PIL import Image

        w, h = img.size
        s = self.size / min(w, h)
        return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)

    def _encode(self, img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=self.quality)
        return buf.getvalue()
