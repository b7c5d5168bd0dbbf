"""The index of a folder data root (issue 16, item 1): `prepare` writes one per split, `index` writes or
checks one, every rank reads it at start-up instead of listing, and a root without one still works.

(Stale and mismatched indexes through `fit`: tests/reliability/test_shards.py; listing once and
reading the index through `fit`: tests/test_train_runs.py; two ranks: tests/test_data_dist.py.)
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import run_cli
from resnet_lamb.data.folder import validate_root
from resnet_lamb.data.index import (LISTING_HINT_FILES, build_index, count_images, index_path, load_root,
                                    read_index, startup_folder)
from resnet_lamb.data.prepare import STAMP
from resnet_lamb.errors import DataError


def test_prepare_writes_an_index_that_matches_a_listing(digits_root):
    listed = validate_root(digits_root)
    loaded = load_root(digits_root, full=True)
    assert loaded.index_hash and loaded.classes == listed.classes and loaded.kind == "folder"
    for split in ("train", "val"):
        a, b = listed.splits[split], loaded.splits[split]
        assert np.array_equal(a.paths, b.paths) and np.array_equal(a.labels, b.labels)
        assert b.sizes.tolist() == [os.path.getsize(a.path(i)) for i in range(len(a))]
        meta = read_index(index_path(digits_root, split)).meta
        assert meta["images"] == len(a) and meta["classes"] == listed.classes and len(meta["hash"]) == 32
        assert set(meta["dirs"]) == {"", *listed.classes}
    assert count_images(digits_root, "train") == 80  # what `plan` counts: the index, nothing listed


def test_index_command_writes_and_checks(tmp_path, digits_root, capsys):
    root = tmp_path / "d"
    shutil.copytree(digits_root, root, ignore=shutil.ignore_patterns("*.index"))
    assert run_cli("index", str(root), "--check") == 2
    assert capsys.readouterr().err.strip() == (f"resnet-lamb: error: {root}: has no index to check; write one: "
                                               f"resnet-lamb index {root}")
    assert run_cli("index", str(root)) == 0
    assert capsys.readouterr().out.strip() == f"{root}: wrote train.index (80 images), val.index (40 images)"
    assert load_root(root).index_hash == load_root(digits_root).index_hash  # the same content, the same hash
    assert run_cli("index", str(root), "--check") == 0
    assert "the index matches the tree (80 train / 40 val images, folder)" in capsys.readouterr().out
    # an edited index fails its content hash
    path = index_path(root, "val")
    idx = read_index(path)
    raw = bytearray(path.read_bytes())
    body = len(raw) - sum(a.nbytes for a in idx.arrays.values())
    _, n, at = idx.meta["arrays"]["labels"]
    raw[body + at: body + at + 8 * n] = idx.arrays["labels"][::-1].tobytes()  # labels swapped, hash kept
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"val.index: damaged or edited \(its content hash does not match\); "
                                        r"rebuild the index: resnet-lamb index "):
        load_root(root)
    path.unlink()
    with pytest.raises(DataError, match=r"val.index: missing, but train.index is there"):
        load_root(root)


def test_prepare_rerun_indexes_a_folder_prepared_without_one(tmp_path, capsys):
    from resnet_lamb.data.prepare import main

    out = tmp_path / "d"
    args = ["digits", "--out", str(out), "--per-class-train", "2", "--per-class-val", "1"]
    assert main(args) == 0 and index_path(out, "train").is_file()
    for s in ("train", "val"):
        index_path(out, s).unlink()
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "wrote its index" in said and "nothing to do" in said and index_path(out, "val").is_file()
    record = json.loads((out / STAMP).read_text())
    assert "shards" not in record["options"]  # folders prepared before indexes keep their stamp's options


def test_start_up_on_ranks_other_than_0(tmp_path, digits_root, monkeypatch):
    """Rank > 0 before the process group exists: the index when there is one (no checks: rank 0 makes
    them); without one, nothing when the recipe gives the counts (rank 0's listing arrives in setup)."""
    import resnet_lamb.data.index as index

    bare = tmp_path / "bare"
    shutil.copytree(digits_root, bare, ignore=shutil.ignore_patterns("*.index"))
    listed = []
    real = index.validate_root
    monkeypatch.setattr(index, "validate_root", lambda *a: listed.append(a) or real(*a))
    assert startup_folder(bare, rank0=False, counts_given=True) is None and listed == []
    assert len(startup_folder(bare, rank0=False, counts_given=False).splits["train"]) == 80 and len(listed) == 1
    stale = tmp_path / "stale"
    shutil.copytree(digits_root, stale)
    shutil.copy(next((stale / "train" / "0").iterdir()), stale / "train" / "0" / "extra.JPEG")
    assert startup_folder(stale, rank0=False, counts_given=True).index_hash  # read, not checked
    with pytest.raises(DataError, match="changed since the index was written"):
        startup_folder(stale, rank0=True, counts_given=True)


def test_a_large_listing_suggests_an_index(tmp_path, digits_root, monkeypatch, capsys):
    import resnet_lamb.data.index as index

    bare = tmp_path / "bare"
    shutil.copytree(digits_root, bare, ignore=shutil.ignore_patterns("*.index"))
    assert LISTING_HINT_FILES == 50_000
    load_root(bare)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(index, "LISTING_HINT_FILES", 100)
    load_root(bare)
    assert capsys.readouterr().err.strip() == (f"resnet-lamb: {bare}: listed 120 files (no index); `resnet-lamb "
                                               f"index {bare}` writes one so that later runs read it instead")
    build_index(bare)
    load_root(bare)
    assert capsys.readouterr().err == ""
