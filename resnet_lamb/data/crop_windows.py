"""Random-resized-crop windows and flips for the DALI backend, computed here instead of by DALI.

Augmentation without DALI's random state: a training sample's random-resized-crop window and flip
are computed here, by :func:`random_resized_crop` (torchvision's algorithm: 10 attempts at scale
0.08-1 and ratio 3/4-4/3, then the centre crop clamped to the ratio range) from
:func:`sample_uniforms` keyed by ``(seed, epoch, file index)``, and passed to
``decoders.image_slice`` (decoding only the window) and ``crop_mirror_normalize`` as per-sample
inputs. A sample's crop is thus the same whatever the world size, micro batch, prefetch depth or
pipeline instance, and a run resumed at any step (an epoch boundary or a SIGUSR1 save mid-epoch)
sees exactly the crops of one never stopped; no DALI checkpoint needs carrying between ranks. The
window needs the image size: read from the file's header (Pillow, lazily; cached per file).
"""

from __future__ import annotations

import io

import numpy as np

from resnet_lamb.data.common import mix64, sample_key

SCALE, RATIO, ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10  # torchvision's RandomResizedCrop defaults


def sample_uniforms(seed: int, epoch: int, keys: np.ndarray, count: int) -> np.ndarray:
    """``(len(keys), count)`` uniforms in [0, 1), a pure function of ``(seed, epoch, key, column)``:
    counter-based (a hash), so any sample's numbers are computed without drawing the others'."""
    z = mix64(sample_key(seed, epoch) ^ np.asarray(keys, dtype=np.uint64))[:, None]
    z = mix64(z ^ np.arange(count, dtype=np.uint64)[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_resized_crop(sizes: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's ``RandomResizedCrop.get_params`` (scale 0.08-1, ratio 3/4-4/3), vectorised over a
    batch: ``sizes`` (B, 2) = (width, height), ``u`` (B, 4 * ATTEMPTS) uniforms -> window start
    (x, y) and shape (w, h), int32 (B, 2) each. Attempt k uses ``u[:, 4k:4k+4]`` for the area, the
    log-ratio, y and x; the first attempt that fits wins; none fits: the centre crop of the whole
    image clamped to the ratio range."""
    W, H = sizes[:, 0:1].astype(np.float64), sizes[:, 1:2].astype(np.float64)
    u = u.reshape(len(sizes), ATTEMPTS, 4)
    area = W * H * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[..., 0])
    lo, hi = np.log(RATIO[0]), np.log(RATIO[1])
    ratio = np.exp(lo + (hi - lo) * u[..., 1])
    w, h = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    k = fits.argmax(axis=1)
    rows = np.arange(len(sizes))
    w, h = w[rows, k], h[rows, k]
    y = np.floor(u[rows, k, 2] * (H[:, 0] - h + 1))
    x = np.floor(u[rows, k, 3] * (W[:, 0] - w + 1))
    # fallback: the whole image, clamped to the ratio range, centred
    Wf, Hf = W[:, 0], H[:, 0]
    wide, tall = Wf / Hf > RATIO[1], Wf / Hf < RATIO[0]
    fw = np.where(wide, np.round(Hf * RATIO[1]), Wf)
    fh = np.where(tall, np.round(Wf / RATIO[0]), Hf)
    none = ~fits.any(axis=1)
    w, h = np.where(none, fw, w), np.where(none, fh, h)
    x, y = np.where(none, (Wf - fw) // 2, x), np.where(none, (Hf - fh) // 2, y)
    start = np.stack([x, y], axis=1).astype(np.int32)
    shape = np.stack([w, h], axis=1).astype(np.int32)
    return start, shape


def header_size(data: np.ndarray) -> tuple[int, int]:
    """(width, height) from an encoded image's header (Pillow reads the header only); (0, 0) when
    it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes() if isinstance(data, np.ndarray) else data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - Pillow raises UnidentifiedImageError, OSError, SyntaxError...
        return 0, 0
