"""Packed shards (issue 16): `prepare --shards` / `pack` write the webdataset layout plus an index, both
backends read members by byte offset in epoch_plan's order, one open per shard per reading process,
and `stage` / `STAGE_DIR` copy a shard set to node-local disk once per node.

(Bad shard input: tests/reliability/test_shards.py; two ranks: tests/test_data_dist.py; kill and
resume: tests/test_train_resume.py.)
"""
from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import read_csv, run_cli, tiny_recipe, write_recipe
from resnet_lamb.data import ImageDataModule
from resnet_lamb.data import dali as dali_backend
from resnet_lamb.data.index import count_images, index_path, load_root, read_index
from resnet_lamb.data.pack import pack, parse_size
from resnet_lamb.data.stage import stage
from resnet_lamb.errors import DataError

BACKENDS = ["torchvision"] + (["dali"] if dali_backend.available() else [])


@pytest.fixture(scope="module")
def packed(tmp_path_factory, digits_root) -> Path:
    """digits_root (80 train / 40 val) packed in shards of at most 8 KiB (a few images each)."""
    out = tmp_path_factory.mktemp("packed") / "shards"
    pack(digits_root, out, shard_size=8 * 1024, quiet=True)
    return out


def _dm(root, backend, **kw):
    args = dict(backend=backend, root=str(root), global_batch=16, micro_batch=8, image_size=16, seed=3,
                workers=0 if backend == "torchvision" else 1)
    args.update(kw)
    dm = ImageDataModule(**args)
    dm.setup("fit")
    return dm


def _epoch(loader, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------------- writing
def test_prepare_digits_shards_then_fit_end_to_end(tmp_path, fit, capsys):
    out = tmp_path / "digits-shards"
    args = ["prepare", "digits", "--out", str(out), "--size", "16", "--per-class-train", "8", "--per-class-val", "4",
            "--shards", "--shard-size", "16K"]
    assert run_cli(*args) == 0
    said = capsys.readouterr().out
    assert "80 train / 40 val images in 10 classes" in said and " shards)" in said
    assert sorted(p.name for p in out.iterdir()) == [".resnet-lamb-prepared.json", "classes.txt", "train",
                                                     "train.index", "val", "val.index"]
    assert all(p.suffix == ".tar" for p in (out / "train").iterdir()) and len(list((out / "train").iterdir())) > 3
    # the webdataset layout: <key>.jpg and <key>.cls pairs, the label as decimal text
    with tarfile.open(next((out / "train").glob("*.tar"))) as tf:
        members = [m for m in tf if m.isfile()]
        names = [m.name for m in members]
        assert names[0].endswith(".jpg") and names[1] == names[0][:-4] + ".cls"
        assert tf.extractfile(members[1]).read() == names[0].split("/")[0].encode()  # class folder "3" -> label 3
    assert run_cli(*args) == 0 and "nothing to do" in capsys.readouterr().out

    # fit reads the shards: no per-image file is opened, each shard at most twice per process (rank 0's
    # start-up check of its first and last member, then the reader that keeps it open)
    opened: list[str] = []
    hook_on = [True]

    def hook(event, a):
        if hook_on[0] and event == "open" and isinstance(a[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(a[0])
            if path.startswith(str(out)):
                opened.append(path)

    sys.addaudithook(hook)
    try:
        run = fit(tiny_recipe(out), name="on-shards")
    finally:
        hook_on[0] = False
    rows = read_csv(run)
    assert any(r.get("val/top1") for r in rows)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["ImageDataModule"]["skipped"] == []
    tars = [p for p in opened if p.endswith(".tar")]
    assert tars and set(opened) - set(tars) <= {str(index_path(out, "train")), str(index_path(out, "val"))}
    assert max(tars.count(p) for p in set(tars)) <= 2
    assert len(set(tars)) == len(list(out.glob("*/*.tar")))


def test_pack_layout_order_size_and_determinism(tmp_path, digits_root, packed):
    folder, shards = load_root(digits_root), load_root(packed, full=True)
    assert shards.kind == "shards" and shards.classes == folder.classes
    for split in ("train", "val"):
        f, s = folder.splits[split], shards.splits[split]
        # the index lists the images in the folder's order: the same image numbers, labels and bytes
        assert [p.decode()[:-5] for p in f.paths.tolist()] == [p.decode()[:-4] for p in s.paths.tolist()]
        assert np.array_equal(f.labels, s.labels)
        assert all(bytes(s.read(i)) == f.read(i) for i in range(len(f)))
        for name, size in read_index(index_path(packed, split)).meta["shards"]:
            assert size == os.path.getsize(packed / split / name)
    # training images are spread over the shards in a seeded order, validation in order
    train = shards.splits["train"]
    assert not np.all(np.diff(train.shard.astype(np.int64) * 2**40 + train.offset) > 0)
    val = shards.splits["val"]
    assert np.all(np.diff(val.shard.astype(np.int64) * 2**40 + val.offset) > 0)
    # shards close at the size asked (tar pads to 10 KiB records): members end within 8 KiB
    assert all(int(train.offset[i] + train.sizes[i]) <= 8 * 1024 for i in range(len(train)))
    again = tmp_path / "again"
    pack(digits_root, again, shard_size=8 * 1024, quiet=True)
    assert all((again / p.relative_to(packed)).read_bytes() == p.read_bytes() for p in packed.glob("*/*.tar"))
    assert parse_size("512M") == 512 * 2**20 and parse_size("16KiB") == 16384 and parse_size("100") == 100
    with pytest.raises(DataError, match="not a size"):
        parse_size("big")


def test_count_images_of_a_shard_set_without_an_index(tmp_path, packed):
    root = tmp_path / "noindex"
    shutil.copytree(packed, root, ignore=shutil.ignore_patterns("*.index"))
    assert not index_path(root, "train").exists()
    assert count_images(root, "train") == 80 and count_images(root, "val") == 40  # read from the tar headers


def test_pack_refuses_keys_that_collide_and_an_output_inside_its_source(tmp_path, digits_root):
    src = tmp_path / "src"
    shutil.copytree(digits_root, src)
    for p in src.glob("*.index"):
        p.unlink()
    one = next((src / "train" / "3").iterdir())
    shutil.copy(one, one.with_name("a.b.JPEG"))
    shutil.copy(one, one.with_name("a_b.JPEG"))
    with pytest.raises(DataError) as err:
        pack(src, tmp_path / "out", quiet=True)
    assert str(err.value) == (f"{src}/train/3/a_b.JPEG: its key 3/a_b is also {src}/train/3/a.b.JPEG's (keys drop "
                              "the extension and turn dots into _); rename one of them")
    with pytest.raises(DataError, match="inside the folder being packed"):
        pack(digits_root, digits_root / "shards", quiet=True)


# ---------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("backend", BACKENDS + ["memory"])
def test_folder_and_its_shards_give_the_same_batches(digits_root, packed, backend):
    a, b = _dm(digits_root, backend), _dm(packed, backend)
    assert (a.train_images, a.val_images, a.classes) == (b.train_images, b.val_images, b.classes)
    for epoch in range(2):  # the same epoch_plan: the same images in the same places
        (xa, ya), (xb, yb) = _epoch(a.train_dataloader(), seed=epoch), _epoch(b.train_dataloader(), seed=epoch)
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    (xa, ya), (xb, yb) = _epoch(a.val_dataloader()), _epoch(b.val_dataloader())
    assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_shard_is_opened_once_per_reading_process(packed, backend):
    dm = _dm(packed, backend)
    split = dm._folder.splits["train"]
    n_shards = len(split.shard_names)
    _epoch(dm.train_dataloader())
    assert split.opened == n_shards  # every shard holds images of every epoch: each opened once
    _epoch(dm.train_dataloader())
    assert split.opened == n_shards  # kept open: none again in the next epoch
    _epoch(dm.val_dataloader())
    assert dm._folder.splits["val"].opened == len(dm._folder.splits["val"].shard_names)


# ---------------------------------------------------------------------------------- staging
def test_stage_copies_once_and_completes_an_interrupted_copy(tmp_path, packed, digits_root):
    dest = tmp_path / "local"
    n = len(list(packed.glob("*/*.tar")))
    assert stage(packed, dest) == {"copied": n, "kept": 0, "bytes": sum(p.stat().st_size for p in packed.glob("*/*.tar"))}
    assert load_root(dest, full=True).index_hash == load_root(packed).index_hash
    assert stage(packed, dest)["copied"] == 0
    # interrupted: a shard not copied yet, no index (written last)
    victim = next((dest / "train").glob("*.tar"))
    victim.unlink()
    index_path(dest, "val").unlink()
    assert stage(packed, dest) == {"copied": 1, "kept": n - 1, "bytes": victim.stat().st_size}
    with pytest.raises(DataError, match=r"a folder with one file per image; pack it first"):
        stage(digits_root, tmp_path / "nope")


def test_torchrun_stage_dir_copies_per_node_then_two_ranks_read_each_image_once(tmp_path, packed):
    from test_launch import _check_shards, _fail_msg, launch_recipe, torchrun

    import json

    rec, local = tmp_path / "rec", tmp_path / "node-local"
    recipe = write_recipe(tmp_path / "r.yaml", launch_recipe(packed, rec))
    p = torchrun(recipe, "--run.root", str(tmp_path / "runs"), "--run.name", "staged", "--run.wandb", "false",
                 NPROC=2, STAGE_DIR=str(local))
    assert p.returncode == 0, _fail_msg(p)
    assert "resnet-lamb stage: " in p.stderr and "shards copied" in p.stderr
    assert sorted(x.name for x in local.glob("*/*.tar")) == sorted(x.name for x in packed.glob("*/*.tar"))
    config = yaml.safe_load((tmp_path / "runs" / "staged" / "config.yaml").read_text())
    assert config["data"]["root"] == str(local)
    records = [json.loads((rec / f"rank{r}.json").read_text()) for r in range(2)]
    labels = load_root(packed).splits
    _check_shards([{"train": r["train"]["0"]} for r in records], "train", labels["train"].labels.tolist(), 80, 2)
    _check_shards(records, "val", labels["val"].labels.tolist(), 40, 2)
