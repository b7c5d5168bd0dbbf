"""`resnet-lamb prepare`: layouts both backends read, idempotence, ImageNet from tiny fake archives."""

import gzip
import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_lamb.data import ImageDataModule, validate_root
from resnet_lamb.data import dali as dali_backend
from resnet_lamb.data.prepare import STAMP, main
from resnet_lamb.errors import DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")
BACKENDS = ["torchvision"] + (["dali"] if dali_backend.available() else [])


def files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*.JPEG"))


def read_with_backends(root, num_classes, image_size=24):
    for backend in BACKENDS:
        dm = ImageDataModule(backend=backend, root=str(root), global_batch=8, micro_batch=8, image_size=image_size,
                             workers=0 if backend == "torchvision" else 1)
        dm.setup("fit")
        assert dm.num_classes == num_classes
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            batches = list(loader)
            labels = torch.cat([y for _, y in batches])
            assert batches[0][0].shape == (8, 3, image_size, image_size)
            assert sorted(labels[labels >= 0].unique().tolist()) == list(range(num_classes))


def test_digits_layout_idempotence_and_both_backends(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["digits", "--out", str(out), "--per-class-train", "3", "--per-class-val", "2", "--seed", "1"]) == 0
    folder = validate_root(out)
    assert folder.classes == [str(c) for c in range(10)]
    assert len(folder.splits["train"]) == 30 and len(folder.splits["val"]) == 20
    assert Image.open(folder.splits["train"].path(0)).size == (32, 32)  # 8x8 upscaled (default --size 32)
    listing = {p: os.stat(out / p).st_mtime_ns for p in files(out)}
    capsys.readouterr()
    assert main(["digits", "--out", str(out), "--per-class-train", "3", "--per-class-val", "2", "--seed", "1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: os.stat(out / p).st_mtime_ns for p in files(out)} == listing
    with pytest.raises(DataError, match="other options"):
        main(["digits", "--out", str(out), "--per-class-train", "4"])
    # deterministic with --seed: a second folder holds the same bytes; train and val do not overlap
    again = tmp_path / "again"
    main(["digits", "--out", str(again), "--per-class-train", "3", "--per-class-val", "2", "--seed", "1"])
    assert all((out / p).read_bytes() == (again / p).read_bytes() for p in files(out))
    names = {split: {Path(p).name.split("_")[1] for p in files(out / split)} for split in ("train", "val")}
    assert not names["train"] & names["val"]
    read_with_backends(out, 10)


def test_interrupted_run_is_completed_and_leaves_no_partial_image(tmp_path):
    out = tmp_path / "d"
    args = ["digits", "--out", str(out), "--per-class-train", "2", "--per-class-val", "1"]
    main(args)
    (out / STAMP).unlink()  # as if interrupted before the end ...
    victim = out / files(out)[0]
    victim.unlink()
    (victim.parent / f".{victim.name}.tmp-123").write_bytes(b"half an image")  # ... mid-write
    main(args)
    assert victim.exists() and (out / STAMP).exists()
    assert len(validate_root(out).splits["train"]) == 20  # the temporary file is not read as an image


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_uses_its_test_split_and_both_backends_read_it(tmp_path):
    out = tmp_path / "fm"
    main(["fashion-mnist", "--out", str(out), "--per-class-train", "2", "--per-class-val", "1", "--size", "32"])
    folder = validate_root(out)
    assert folder.classes[0] == "0-tshirt-top" and len(folder.classes) == 10
    assert len(folder.splits["train"]) == 20 and len(folder.splits["val"]) == 10
    assert Image.open(folder.splits["val"].path(0)).size == (32, 32)
    read_with_backends(out, 10)


def write_idx(path, array, compress):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_mnist_from_raw_idx_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n, compress in (("train", 30, False), ("t10k", 10, True)):
        suffix = ".gz" if compress else ""
        write_idx(src / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 255, (n, 28, 28)), compress)
        write_idx(src / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)
    out = tmp_path / "mnist"
    main(["mnist", "--out", str(out), "--source", str(src), "--per-class-train", "2"])
    folder = validate_root(out)
    assert len(folder.splits["train"]) == 20 and len(folder.splits["val"]) == 10
    with pytest.raises(DataError, match="--source"):
        main(["mnist", "--out", str(tmp_path / "x")])
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        main(["mnist", "--out", str(tmp_path / "x"), "--source", str(tmp_path / "nope")])


def jpeg_bytes(w=60, h=45, seed=0):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_foolbox_photos_found_without_importing_foolbox(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "foolbox"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    for i, label in enumerate((243, 559, 438)):
        (pkg / "data" / f"imagenet_{i:02d}_{label}.jpg").write_bytes(jpeg_bytes(seed=i))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "fb"
    main(["foolbox-imagenet", "--out", str(out)])
    folder = validate_root(out)
    assert folder.classes == ["0243", "0438", "0559"] and len(folder.splits["val"]) == 3
    assert (out / "train" / "0243" / "imagenet_00_243.JPEG").read_bytes() == jpeg_bytes(seed=0)  # full size, as is
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install foolbox==3\.3\.4"):
        main(["foolbox-imagenet", "--out", str(tmp_path / "x")])


def add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def fake_imagenet(tmp_path):
    import scipy.io

    wnids = ["n01440764", "n01443537"]
    train = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(train, "w") as outer:
        for k, wnid in enumerate(wnids):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(3):
                    add(inner, f"{wnid}_{i}.JPEG", jpeg_bytes(seed=10 * k + i))
            add(outer, f"{wnid}.tar", buf.getvalue())
    val = tmp_path / "ILSVRC2012_img_val.tar"
    truth = [2, 1, 2]  # ILSVRC2012_ID per val image
    with tarfile.open(val, "w") as tf:
        for i in range(3):
            add(tf, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(seed=100 + i))
    synsets = np.array([(1, wnids[0], "tench", 0), (2, wnids[1], "goldfish", 0), (1001, "n00000001", "fish", 2)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    devkit = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit, "w:gz") as tf:
        add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
            "".join(f"{t}\n" for t in truth).encode())
    return train, val, devkit


def test_imagenet_from_fake_archives(tmp_path, capsys):
    train, val, devkit = fake_imagenet(tmp_path)
    out = tmp_path / "imagenet"
    args = ["imagenet", "--out", str(out), "--train-tar", str(train), "--val-tar", str(val), "--devkit", str(devkit)]
    main(args + ["--per-class-train", "2"])
    assert files(out) == ["train/n01440764/n01440764_0.JPEG", "train/n01440764/n01440764_1.JPEG",
                          "train/n01443537/n01443537_0.JPEG", "train/n01443537/n01443537_1.JPEG",
                          "val/n01440764/ILSVRC2012_val_00000002.JPEG", "val/n01443537/ILSVRC2012_val_00000001.JPEG",
                          "val/n01443537/ILSVRC2012_val_00000003.JPEG"]
    assert (out / "train/n01443537/n01443537_1.JPEG").read_bytes() == jpeg_bytes(seed=11)  # copied as is
    capsys.readouterr()
    main(args + ["--per-class-train", "2"])
    assert "nothing to do" in capsys.readouterr().out
    read_with_backends(out, 2)
    for flag in ("--train-tar", "--val-tar", "--devkit"):
        bad = list(args)
        bad[bad.index(flag) + 1] = str(tmp_path / "missing.tar")
        with pytest.raises(DataError, match="missing.tar: not found"):
            main(bad[:1] + ["--out", str(tmp_path / "y")] + bad[3:])
    with pytest.raises(DataError, match="--train-tar"):
        main(["imagenet", "--out", str(tmp_path / "z")])


def test_cli_prints_one_line_for_a_missing_source(tmp_path, capsys):
    from resnet_lamb.cli import main as cli

    assert cli(["prepare", "fashion-mnist", "--out", str(tmp_path / "o"), "--source", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resnet-lamb: error:") and str(tmp_path / "none") in err and "\n" not in err
