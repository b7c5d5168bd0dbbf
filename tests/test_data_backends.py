"""ImageDataModule on the CPU: DALI (CPU-only mode) and torchvision agree; corrupt images on every backend."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_lamb.data import ImageDataModule
from resnet_lamb.data import dali as dali_backend
from resnet_lamb.data.sampling import epoch_plan
from resnet_lamb.errors import DataError, RecipeError

needs_dali = pytest.mark.skipif(not dali_backend.available(), reason="nvidia-dali not installed")


def make_folder(root, classes=3, train_per=5, val_per=2, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    for split, per in (("train", train_per), ("val", val_per)):
        for c in range(classes):
            d = os.path.join(root, split, f"c{c:02d}")
            os.makedirs(d, exist_ok=True)
            for i in range(per):
                small = (rng.random((size[1] // 5, size[0] // 5, 3)) * 255).astype(np.uint8)
                Image.fromarray(small).resize(size, Image.BILINEAR).save(os.path.join(d, f"{i}.JPEG"), quality=92)
    return str(root)


def dm_for(root, backend, **kw):
    args = dict(backend=backend, root=root, global_batch=4, micro_batch=2, image_size=24, workers=1)
    args.update(kw)
    dm = ImageDataModule(**args)
    dm.setup("fit")
    return dm


def first_batch(loader):
    for batch in loader:
        return batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("img"))


@needs_dali
@pytest.mark.parametrize("channels_last", [False, True])
def test_dali_and_torchvision_batches_agree(folder, channels_last):
    out = {}
    for backend in ("dali", "torchvision"):
        dm = dm_for(folder, backend, channels_last=channels_last)
        out[backend] = {s: first_batch(getattr(dm, f"{s}_dataloader")()) for s in ("train", "val")}
        assert len(dm.train_dataloader()) == dm.steps_per_epoch * dm.accumulation == 8
        assert len(dm.val_dataloader()) == 3  # ceil(6 / 2)
    for split in ("train", "val"):
        (xd, yd), (xt, yt) = out["dali"][split], out["torchvision"][split]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for x, y in ((xd, yd), (xt, yt)):
            assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32
            assert x.is_contiguous(memory_format=fmt)
            assert y.shape == (2,) and y.dtype == torch.int64
            # normalised with ImageNet mean/std: (0 - mean)/std .. (1 - mean)/std
            assert x.min() >= -2.12 and x.max() <= 2.65 and x.min() < -0.5 and x.max() > 0.5
        assert xd.stride() == xt.stride()
        assert torch.equal(yd, yt)  # same order: the same epoch_plan
    # validation is deterministic: both backends give nearly the same pixels (RGB order, mean/std, crop)
    (xd, _), (xt, _) = out["dali"]["val"], out["torchvision"]["val"]
    assert (xd - xt).abs().mean() < 0.15


@needs_dali
@pytest.mark.parametrize("backend", ["dali", "torchvision", "synthetic"])
def test_dtype_and_counts(folder, backend):
    kw = dict(train_images=15, val_images=6, num_classes=3) if backend == "synthetic" else {}
    dm = dm_for(folder, backend, dtype="bfloat16", channels_last=True, **kw)
    x, y = first_batch(dm.train_dataloader())
    assert x.dtype == torch.bfloat16 and x.shape == (2, 3, 24, 24) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and y.shape == (2,)
    assert (dm.num_classes, dm.train_images, dm.val_images) == (3, 15, 6)
    assert (dm.steps_per_epoch, dm.accumulation) == (4, 2)
    assert len(dm.train_dataloader()) == 8 and sum(1 for _ in dm.train_dataloader()) == 8
    if backend != "synthetic":
        assert dm.classes == ["c00", "c01", "c02"]


@needs_dali
def test_dali_batches_stay_valid_while_held(folder):
    """DALI's outputs are shared with torch, not copied: later pipeline runs must not overwrite a held batch."""
    loader = dm_for(folder, "dali", prefetch=1).train_dataloader()
    held = [(x, x.clone(), y, y.clone()) for x, y in loader]
    for _ in range(2):
        for _ in loader:
            pass
    assert all(torch.equal(x, xc) and torch.equal(y, yc) for x, xc, y, yc in held)


def test_auto_backend_and_missing_dali(folder, monkeypatch, capsys):
    assert ImageDataModule(root=folder).backend == ("dali" if dali_backend.available() else "torchvision")
    monkeypatch.setattr(dali_backend, "available", lambda: False)
    assert ImageDataModule(root=folder).backend == "torchvision"
    assert "DALI not installed" in capsys.readouterr().err
    with pytest.raises(DataError, match="pip install"):
        ImageDataModule(root=folder, backend="dali").setup("fit")


@pytest.mark.parametrize("backend, mode", [("dali", "padded"), ("torchvision", "padded"), ("dali", "full_batch"),
                                           ("torchvision", "full_batch"), ("memory", "full_batch")])
def test_epoch_from_trainer_and_from_state_dict(tmp_path, backend, mode):
    """Every backend reads epoch_plan's order in both epoch modes, for the epoch the trainer (or a
    restored state) says: full_batch epochs continue the stream where the previous one ended."""
    if backend == "dali" and not dali_backend.available():
        pytest.skip("nvidia-dali not installed")
    root = make_folder(tmp_path, classes=7, train_per=1, val_per=1, size=(16, 16))  # label == image index
    want = [epoch_plan(7, 4, 2, 1, 0, epoch=e, seed=5, mode=mode) for e in (0, 1, 2)]
    want = [np.where(real, idx, -1).tolist() for idx, real in want]
    if mode == "full_batch":  # 2 full steps of 4 per epoch: 3 epochs are 24 stream positions, passes of 7
        flat = sum(want, [])  # micro-batches of 2, 2 a step; stream position j of a step is micro j % 2, row j // 2
        stream = [flat[4 * s + 2 * (j % 2) + j // 2] for s in range(6) for j in range(4)]
        assert -1 not in stream and all(sorted(stream[p * 7:(p + 1) * 7]) == list(range(7)) for p in range(3))
    kw = dict(seed=5, workers=0 if backend == "torchvision" else 1, epoch_mode=mode)
    dm = dm_for(root, backend, **kw)
    got = [torch.cat([y for _, y in dm.train_dataloader()]).tolist() for _ in range(2)]
    assert got == want[:2]
    state = dm.state_dict()
    assert state["epoch"] == 2
    resumed = dm_for(root, backend, **kw)
    resumed.load_state_dict(state)
    assert torch.cat([y for _, y in resumed.train_dataloader()]).tolist() == want[2]
    traced = dm_for(root, backend, **kw)
    traced.trainer = SimpleNamespace(world_size=1, global_rank=0, current_epoch=1)
    traced.setup("fit")
    loader = traced.train_dataloader()
    first = next(iter(loader))  # an epoch cut short (limit_train_batches) ...
    assert first[1].tolist() == want[1][:2]
    traced.trainer.current_epoch = 2  # ... then the next epoch starts at its own beginning
    assert torch.cat([y for _, y in loader]).tolist() == want[2]
    val = [torch.cat([y for _, y in traced.val_dataloader()]).tolist() for _ in range(2)]
    assert val[0] == val[1] == [0, 1, 2, 3, 4, 5, 6, -1]


def test_world_size_from_trainer(folder):
    dm = ImageDataModule(backend="torchvision", root=folder, global_batch=8, micro_batch=2, image_size=24, workers=0)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, current_epoch=0)
    dm.setup("fit")
    assert (dm.world_size, dm.global_rank, dm.accumulation, dm.steps_per_epoch) == (2, 1, 2, 2)
    assert len(dm.train_dataloader()) == 4 and len(dm.val_dataloader()) == 2
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0, current_epoch=0)
    with pytest.raises(RecipeError, match="global_batch"):
        dm.setup("fit")


def test_teardown_ends_the_torchvision_workers(folder):
    """Persistent DataLoader workers end at ``teardown``, also when a pass was left half done (a fit
    stopped mid-epoch), and not only at garbage collection."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    dm = dm_for(folder, "torchvision", workers=2)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    it = iter(train)
    next(it)  # the train pass stays suspended, holding its iterator (and so its workers)
    assert len(list(val)) == len(val)
    assert len(set(multiprocessing.active_children()) - before) == 4, "two persistent workers per split"
    dm.teardown("fit")
    assert not set(multiprocessing.active_children()) - before, "a worker outlives the data module's teardown"
    dm.setup("fit")  # a later fit (or validate) gets new loaders with their own workers
    assert len(list(dm.val_dataloader())) == len(val)
    dm.teardown("fit")
    assert not set(multiprocessing.active_children()) - before


# ---- bad input ------------------------------------------------------------------------------------
# (folder layout errors: the matrix in tests/reliability/test_data.py)


# workers=0: the torchvision loader and its dataset share one process (and one set of bad files)
@pytest.mark.parametrize(("backend", "workers"), [("dali", 1), ("torchvision", 1), ("torchvision", 0)])
def test_corrupt_images_are_skipped_and_counted(tmp_path, backend, workers, capfd):
    if backend == "dali" and not dali_backend.available():
        pytest.skip("nvidia-dali not installed")
    root = make_folder(tmp_path, classes=3, train_per=3, val_per=1, size=(32, 24))
    good = open(os.path.join(root, "train", "c01", "0.JPEG"), "rb").read()
    truncated = os.path.join(root, "train", "c01", "1.JPEG")
    text = os.path.join(root, "train", "c01", "2.JPEG")
    open(truncated, "wb").write(good[: len(good) // 2])
    open(text, "wb").write(b"this is not an image")
    dm = dm_for(root, backend, workers=workers)
    for epoch in range(2):
        labels = torch.cat([y for _, y in dm.train_dataloader()])
        assert (labels == 1).sum() == 1  # c01 keeps only its good image
        assert (labels >= 0).sum() == 7 and len(labels) == 12
    assert sorted(dm.skipped) == sorted([truncated, text])
    err = capfd.readouterr().err
    assert err.count(truncated) == 1 and err.count(text) == 1  # one warning each, not one per epoch
    # a resumed run starts with the known-bad files skipped
    resumed = dm_for(root, backend)
    resumed.load_state_dict(dm.state_dict())
    assert (torch.cat([y for _, y in resumed.train_dataloader()]) >= 0).sum() == 7
    assert truncated not in capfd.readouterr().err  # known from the checkpoint: no second warning
