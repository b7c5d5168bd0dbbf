"""Issue 16, item 4: bad shards and bad indexes, through `resnet-lamb fit` as a user meets them.

Each is one line naming the shard and the member (or the folder), exit 2, before the model or a data
loader is built, wherever a cheap check at start-up can see it: a truncated shard, a missing shard,
an index entry whose member is not in its shard, a duplicate key, an index from another data set, a
folder index gone stale. What only a full comparison sees (a member renamed in place, the shard's
size unchanged) is found up front with ``--data.index_check true``, and otherwise at the first read
of that member, still as one line. A corrupt image inside a shard is skipped and counted, as in a
folder (one warning naming ``<shard>::<member>``, listed in the checkpoint).
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import jpeg_tree, run_cli, tiny_recipe, write_recipe
from resnet_lamb.data import ImageDataModule
from resnet_lamb.data import dali as dali_backend
from resnet_lamb.data.index import build_index, index_path
from resnet_lamb.data.pack import pack
from resnet_lamb.errors import DataError


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """2 classes x 4 train / 2 val 16-px JPEGs, with its index."""
    root = jpeg_tree(tmp_path_factory.mktemp("src") / "data")
    build_index(root)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory, source) -> Path:
    """``source`` packed three images per shard (a sample takes 2.5 KiB: headers, JPEG, label)."""
    out = tmp_path_factory.mktemp("shards") / "data"
    pack(source, out, shard_size=8 * 1024, quiet=True)
    assert len(list((out / "train").glob("*.tar"))) >= 3
    return out


def _members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tf:
        return [m for m in tf if m.isfile()]


def _rewrite(shard: Path, keep) -> None:
    """Write ``shard`` again with the members ``keep(member)`` accepts (same format as pack)."""
    with tarfile.open(shard) as tf:
        items = [(m, tf.extractfile(m).read()) for m in tf if m.isfile()]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tf:
        for m, data in items:
            if keep(m):
                tf.addfile(m, io.BytesIO(data))


def _rename_in_place(shard: Path, member: tarfile.TarInfo, new: str) -> None:
    """Change a member's name in its header (same length, checksum fixed): the shard's size stays."""
    b = bytearray(shard.read_bytes())
    h = member.offset
    assert len(new) == len(member.name)
    b[h:h + 100] = new.encode().ljust(100, b"\0")
    b[h + 148:h + 156] = b" " * 8
    b[h + 148:h + 156] = b"%06o\0 " % sum(b[h:h + 512])
    shard.write_bytes(bytes(b))


def _fit_args(tmp_path: Path, root: Path, **data) -> list[str]:
    recipe = tiny_recipe(root, **{"trainer.max_epochs": 1, "model.num_classes": 2, "data.global_batch": 4,
                                  "data.micro_batch": 4, "trainer.enable_progress_bar": False})
    recipe["data"].update(data)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    return ["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.name", "run",
            "--run.wandb", "false"]


def _copy(src: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(src, root)
    return root


def _second_train_shard(root: Path) -> Path:
    return sorted((root / "train").glob("*.tar"))[1]


# id: (change the copied shard set -> the line's text)
def _truncate(root):
    shard = _second_train_shard(root)
    first = _members(shard)[0]
    shard.write_bytes(shard.read_bytes()[: first.offset_data + 10])
    return f"{shard}: truncated at {first.offset_data + 10} bytes: member {first.name} (bytes {first.offset_data}-" \
           f"{first.offset_data + first.size}) is cut off; copy the shard again"


def _missing(root):
    shard = sorted((root / "val").glob("*.tar"))[-1]
    images = [m.name for m in _members(shard) if m.name.endswith(".jpg")]
    shard.unlink()
    return f"{shard}: missing shard (No such file or directory); the index lists {len(images)} images in it (the " \
           f"first: {images[0]}); copy it back, or rebuild the index: resnet-lamb index {root}"


def _entry_without_member(root):
    shard = _second_train_shard(root)
    gone = _members(shard)[0]  # the index still lists it; the shard was packed again without it
    _rewrite(shard, lambda m: not m.name.startswith(gone.name.rsplit(".", 1)[0] + "."))
    return f"{shard}: no member {gone.name} at byte {gone.offset_data} as the index says (the index is stale or " \
           f"from another data set); rebuild the index: resnet-lamb index {root}"


def _another_data_set(root):
    other = root.parent / "other"
    pack(jpeg_tree(root.parent / "other-src", seed=1, per=(5, 2)), other, shard_size=8 * 1024, quiet=True)
    for s in ("train", "val"):
        shutil.copy(index_path(other, s), index_path(root, s))
    shard = sorted((root / "train").glob("*.tar"))[0]
    return f"{shard}: no member "  # the other set's first member in it, then "at byte N as the index says"


BAD_SETS = {"truncated-shard": _truncate, "missing-shard": _missing, "entry-without-member": _entry_without_member,
            "index-from-another-data-set": _another_data_set}


@pytest.mark.parametrize("row", list(BAD_SETS))
def test_bad_shard_set_stops_at_start_up_naming_shard_and_member(row, shards, tmp_path, capsys, untouched):
    root = _copy(shards, tmp_path)
    says = BAD_SETS[row](root)
    capsys.readouterr()
    rc = run_cli(*_fit_args(tmp_path, root))
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("resnet-lamb: error: ") and says in lines[0], lines[0]
    assert ".tar" in lines[0] and (".jpg" in lines[0]), "names the shard and the member"
    assert out.out == "" and not untouched and not (tmp_path / "runs").exists()
    # the data module's own check (rank 0 at setup) says the same
    with pytest.raises(DataError) as err:
        ImageDataModule(backend="torchvision", root=str(root), global_batch=4, micro_batch=4).setup("fit")
    assert str(err.value) in lines[0]


def _duplicate_key_set(tmp_path: Path, shards: Path) -> tuple[Path, str]:
    """Shards made elsewhere (no index) where a key is in two shards."""
    root = _copy(shards, tmp_path)
    for s in ("train", "val"):
        index_path(root, s).unlink()
    a, b = sorted((root / "train").glob("*.tar"))[:2]
    dup = _members(a)[0]
    with tarfile.open(a) as tf:
        items = [(m, tf.extractfile(m).read()) for m in tf if m.isfile() and m.name.startswith(dup.name[:-4])]
    with tarfile.open(b) as tf:
        rest = [(m, tf.extractfile(m).read()) for m in tf if m.isfile()]
    with tarfile.open(b, "w", format=tarfile.GNU_FORMAT) as tf:
        for m, data in rest + items:
            tf.addfile(m, io.BytesIO(data))
    return root, f"{b}: duplicate key {dup.name[:-4]}: members {a.name}::{dup.name} and {b.name}::{dup.name}; " \
                 "each image needs its own key: pack the data again"


def test_duplicate_key_is_one_line_from_fit_and_from_index(shards, tmp_path, capsys, untouched):
    root, says = _duplicate_key_set(tmp_path, shards)
    capsys.readouterr()
    assert run_cli(*_fit_args(tmp_path, root)) == 2  # no index: rank 0 reads the headers, as it lists a folder
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"resnet-lamb: error: {says}"] and not untouched
    assert run_cli("index", str(root)) == 2
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()] == [f"resnet-lamb: error: {says}"]
    assert not index_path(root, "train").exists()


def test_shards_without_index_are_read_and_indexed(shards, tmp_path, capsys):
    root = _copy(shards, tmp_path)
    for s in ("train", "val"):
        index_path(root, s).unlink()
    dm = ImageDataModule(backend="torchvision", root=str(root), global_batch=4, micro_batch=4, image_size=16,
                         workers=0)
    dm.setup("fit")
    assert (dm.train_images, dm.val_images, dm.classes) == (8, 4, ["c0", "c1"])
    assert run_cli("index", str(root)) == 0 and "train.index (8 images)" in capsys.readouterr().out
    assert run_cli("index", str(root), "--check") == 0
    assert read_bytes_equal(root, shards)


def read_bytes_equal(a: Path, b: Path) -> bool:
    """The rebuilt index lists the same members, offsets and labels as the one pack wrote."""
    from resnet_lamb.data.index import read_index

    return all(read_index(index_path(a, s)).meta["hash"] == read_index(index_path(b, s)).meta["hash"]
               for s in ("train", "val"))


def _renamed_in_place(shards: Path, tmp_path: Path) -> tuple[Path, str]:
    """A member of the second training shard renamed in its header: the shard's size stays."""
    root = _copy(shards, tmp_path)
    shard = _second_train_shard(root)
    members = _members(shard)
    assert len(members) == 6, "three images: the renamed one is neither the shard's first nor its last"
    victim = members[2]
    _rename_in_place(shard, victim, victim.name.replace(".jpg", ".png"))
    return root, f"{shard}: no member {victim.name} at byte {victim.offset_data} as the index says (the index is " \
                 f"stale or from another data set); rebuild the index: resnet-lamb index {root}"


def test_member_renamed_in_place_is_found_up_front_by_index_check(shards, tmp_path, capsys, untouched):
    root, says = _renamed_in_place(shards, tmp_path)
    capsys.readouterr()
    assert run_cli(*_fit_args(tmp_path, root, index_check=True)) == 2
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()] == [f"resnet-lamb: error: {says}"]
    assert not untouched
    assert run_cli("index", str(root), "--check") == 2
    assert capsys.readouterr().err.strip() == f"resnet-lamb: error: {says}"


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_member_renamed_in_place_stops_at_its_first_read_with_one_line(backend, shards, tmp_path):
    """Without the full check the start-up passes (same size, same first and last members); every read
    checks the member's header, so the run stops there with the same line instead of training on it."""
    if backend == "dali" and not dali_backend.available():
        pytest.skip("nvidia-dali not installed")
    root, says = _renamed_in_place(shards, tmp_path)
    dm = ImageDataModule(backend=backend, root=str(root), global_batch=4, micro_batch=4, image_size=16, workers=1)
    dm.setup("fit")
    with pytest.raises(DataError) as err:
        for _ in dm.train_dataloader():
            pass
    assert str(err.value) == says


# ---------------------------------------------------------------------------------- folder index
def test_stale_folder_index_is_one_line_and_index_check_lists_the_tree(source, tmp_path, capsys, untouched):
    root = _copy(source, tmp_path)
    extra = root / "train" / "c1" / "new.JPEG"
    shutil.copy(root / "train" / "c1" / "0.JPEG", extra)
    capsys.readouterr()
    assert run_cli(*_fit_args(tmp_path, root)) == 2
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()] == [
        f"resnet-lamb: error: {root}/train/c1: changed since the index was written (files added, removed or renamed, "
        f"or copied without its times); rebuild the index: resnet-lamb index {root}, or check it with "
        "--data.index_check true"]
    # the same change with the folder's time put back: only re-listing the tree sees it
    stamp = (root / "train" / "c0").stat()
    os.utime(root / "train" / "c1", ns=(stamp.st_atime_ns, source.joinpath("train", "c1").stat().st_mtime_ns))
    assert run_cli(*_fit_args(tmp_path, root, index_check=True)) == 2
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()] == [
        f"resnet-lamb: error: {extra}: in the tree but not in the index; rebuild the index: resnet-lamb index {root}"]
    assert not untouched
    assert run_cli("index", str(root)) == 0
    assert run_cli("index", str(root), "--check") == 0


def test_folder_index_from_another_data_set(source, tmp_path, capsys, untouched):
    root = _copy(source, tmp_path)
    other = jpeg_tree(tmp_path / "other", seed=3, per=(3, 1))
    build_index(other)
    for s in ("train", "val"):
        shutil.copy(index_path(other, s), index_path(root, s))
    capsys.readouterr()
    assert run_cli(*_fit_args(tmp_path, root)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"resnet-lamb: error: {root}/train") and \
        "changed since the index was written" in lines[0] and f"resnet-lamb index {root}" in lines[0], lines
    assert not untouched


# ---------------------------------------------------------------------------------- corrupt image
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_corrupt_image_inside_a_shard_is_skipped_and_counted(backend, shards, tmp_path, capsys):
    if backend == "dali" and not dali_backend.available():
        pytest.skip("nvidia-dali not installed")
    root = _copy(shards, tmp_path)
    shard = _second_train_shard(root)
    victim = next(m for m in _members(shard) if m.name.endswith(".jpg"))
    b = bytearray(shard.read_bytes())
    b[victim.offset_data + 2:victim.offset_data + 62] = b"\0" * 60  # a damaged JPEG header, same size
    shard.write_bytes(bytes(b))
    name = f"{shard}::{victim.name}"
    capsys.readouterr()
    assert run_cli(*_fit_args(tmp_path, root, backend=backend, workers=1)) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if name in ln]
    assert len(warned) == 1 and warned[0].startswith(f"resnet-lamb: warning: {name}: corrupt or unreadable image (") \
        and warned[0].endswith("skipped for the rest of the run (label -1); replace the image and pack the data "
                               "again (resnet-lamb pack)"), warned
    ckpt = torch.load(tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ImageDataModule"]["skipped"] == [name]
    # a resumed data module skips it without a new warning; 7 of 8 training images count
    dm = ImageDataModule(backend=backend, root=str(root), global_batch=4, micro_batch=4, image_size=16, workers=1)
    dm.load_state_dict(ckpt["ImageDataModule"])
    dm.setup("fit")
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert (labels >= 0).sum() == 7 and name not in capsys.readouterr().err
