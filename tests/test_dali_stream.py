"""The DALI backend's one-pipeline-per-split stream (issue 14, item 1), in DALI's CPU-only mode:

- the per-sample random-resized-crop windows are torchvision's ``RandomResizedCrop.get_params``
  (checked against a literal per-sample transcription fed the same uniforms), and DALI's
  ``decoders.image_slice`` cuts exactly that window ((x, y), (w, h) order);
- the crops and flips of a sample depend on (seed, epoch, file) only: the same batches whatever the
  prefetch depth, and a loader resumed mid-epoch (Lightning's stateful-loader protocol) yields the
  rest of the epoch exactly as an uninterrupted one;
- a 3-epoch `fit` builds one pipeline per split (counted) and leaves no thread or process behind;
  resumed from its epoch-1 checkpoint it ends with bit-identical weights.
"""
from __future__ import annotations

import io
import math
import random
import threading

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_recipe, write_recipe
from resnet_lamb.data import crop_windows
from resnet_lamb.data import dali as dali_backend

pytestmark = pytest.mark.skipif(not dali_backend.available(), reason="nvidia-dali not installed")


def _torchvision_get_params(width, height, draws):
    """torchvision.transforms.RandomResizedCrop.get_params with its random draws replaced by ``draws``
    (per attempt: area, log-ratio, y, x in [0, 1)), as written there."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for k in range(10):
        ua, ur, uy, ux = draws[4 * k:4 * k + 4]
        target_area = area * (0.08 + (1.0 - 0.08) * ua)
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ur)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uy * (height - h + 1))  # torch.randint(0, height - h + 1)
            j = int(ux * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_windows_are_torchvisions():
    rng = random.Random(0)
    sizes = np.array([[rng.randint(1, 900), rng.randint(1, 900)] for _ in range(3000)]
                     + [[500, 20], [20, 500], [1, 1], [7, 3]], dtype=np.int32)
    u = crop_windows.sample_uniforms(3, 1, np.arange(len(sizes)), 40)
    u[::7, 0::4] = 0.999  # large areas: more attempts fail, more fallbacks
    start, shape = crop_windows.random_resized_crop(sizes, u)
    for (w0, h0), (x, y), (w, h), draws in zip(sizes, start, shape, u):
        assert (y, x, h, w) == _torchvision_get_params(int(w0), int(h0), draws)
        assert 0 <= x and x + w <= w0 and 0 <= y and y + h <= h0 and w > 0 and h > 0


def test_uniforms_are_a_function_of_seed_epoch_and_key():
    keys = np.array([5, 9, 1234567, 2**40])
    a = crop_windows.sample_uniforms(1, 2, keys, 41)
    assert a.shape == (4, 41) and (a >= 0).all() and (a < 1).all()
    assert np.array_equal(a[2], crop_windows.sample_uniforms(1, 2, keys[2:3], 41)[0])
    assert not np.array_equal(a, crop_windows.sample_uniforms(1, 3, keys, 41))
    assert not np.array_equal(a, crop_windows.sample_uniforms(2, 2, keys, 41))
    many = crop_windows.sample_uniforms(0, 0, np.arange(20000), 4)
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.std() - math.sqrt(1 / 12)) < 0.01


def test_image_slice_cuts_the_window():
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    pixels = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")  # lossless: DALI decodes exactly these pixels
    enc = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    assert crop_windows.header_size(enc) == (53, 37)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        e, start, shape = fn.external_source(source=lambda: ([enc], np.array([[7, 4]], np.int32),
                                                             np.array([[20, 11]], np.int32)),
                                             num_outputs=3, batch=True)
        return fn.decoders.image_slice(e, start=start, shape=shape, device="cpu", output_type=types.RGB,
                                       adjust_orientation=False)

    p = pipe()
    p.build()
    (out,) = p.run()
    assert np.array_equal(np.array(out.as_tensor())[0], pixels[4:4 + 11, 7:7 + 20])


def _loader(root, **kw):
    from resnet_lamb.data import ImageDataModule

    args = dict(backend="dali", root=str(root), global_batch=16, micro_batch=8, image_size=16, workers=1, seed=3)
    args.update(kw)
    dm = ImageDataModule(**args)
    dm.setup("fit")
    return dm, dm.train_dataloader()


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_stream_is_exact_across_prefetch_depths_and_mid_epoch_resume(digits_root):
    before = dali_backend.PIPELINES_BUILT
    dm0, deep = _loader(digits_root, prefetch=3)
    epochs = [_epoch(deep) for _ in range(3)]  # loader-counted epochs 0, 1, 2
    assert dali_backend.PIPELINES_BUILT - before == 1, "one pipeline for three passes"
    assert len(epochs[0]) == 10 and not _same(epochs[0], epochs[1])  # 80 images: 5 steps x accumulation 2
    dm1, shallow = _loader(digits_root, prefetch=1)
    assert _same(_epoch(shallow), epochs[0])
    # a loader stopped after 3 batches of epoch 1, its state saved, and a new one resumed from it
    dm, stopped = _loader(digits_root)
    _epoch(stopped)
    it = iter(stopped)
    head = [next(it) for _ in range(3)]
    state = stopped.state_dict()
    assert state == {"epoch": 1, "images": 24}
    assert _same([(x, y) for x, y in head], epochs[1][:3])
    dm2, resumed = _loader(digits_root)
    resumed.load_state_dict(state)
    resumed.epoch_fn = lambda: 1
    assert _same(_epoch(resumed), epochs[1][3:])
    resumed.epoch_fn = lambda: 2  # the next epoch starts at its beginning
    assert _same(_epoch(resumed), epochs[2])
    for d in (dm0, dm1, dm, dm2):
        d.teardown("fit")


def _threads():
    return sorted(t.name for t in threading.enumerate())


def test_fit_builds_one_pipeline_per_split_and_resumes_exactly(tmp_path, digits_root, one_thread):
    import multiprocessing

    recipe = tiny_recipe(digits_root, **{"data.backend": "dali", "data.workers": 2, "trainer.max_epochs": 3,
                                         "trainer.enable_progress_bar": False})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    common = ["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"]
    threads, children = _threads(), set(multiprocessing.active_children())  # earlier tests' are not this fit's
    before = dali_backend.PIPELINES_BUILT
    assert run_cli(*common, "--run.name", "straight") == 0
    assert dali_backend.PIPELINES_BUILT - before == 2, "one training and one validation pipeline for 3 epochs"
    assert not set(multiprocessing.active_children()) - children, "no process of the fit outlives it"
    assert not [t for t in _threads() if t not in threads], "the loaders' threads end with the fit"
    # the same run stopped after epoch 1 (its checkpoint), then resumed in a fresh fit
    assert run_cli(*common, "--run.name", "resumed", "--trainer.max_steps", "6") == 0
    assert run_cli(*common, "--run.name", "resumed", "--ckpt_path", "last") == 0
    a = torch.load(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 9
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
