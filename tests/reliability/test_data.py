"""Issue 7, item 4: bad data folders, through `resnet-lamb fit` as a user meets them.

README "Data": a layout problem (missing root or split, empty split or class, class folders that
differ, a file that is not an image, a broken symlink or symlink loop, a folder this user cannot
list) stops the run at start-up with one line naming the path, exit 2, before the model or a data
loader is built. A bad image file (corrupt, truncated, not an image inside, empty, unreadable) is
found at decode time: skipped and counted -- one warning naming the file, the run goes on, and the
checkpoint's data-module state lists the file.

Permissions: the two checks that need them run `fit` in a subprocess that obeys file modes (as root:
without the DAC-override capabilities, see the ``unprivileged`` fixture).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, jpeg_tree, run_cli, tiny_recipe, write_recipe
from resnet_lamb.data import ImageDataModule
from resnet_lamb.errors import DataError



@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """2 classes x 4 train / 2 val 16-px JPEGs."""
    return jpeg_tree(tmp_path_factory.mktemp("template") / "data")


def _recipe(root: Path, **over) -> dict:
    recipe = tiny_recipe(root, **{"trainer.max_epochs": 1, "model.num_classes": 2, "data.global_batch": 4,
                                  "data.micro_batch": 4, "data.workers": 0, "trainer.enable_progress_bar": False})
    for key, value in over.items():
        recipe["data"][key] = value
    return recipe


def _fit_args(tmp_path: Path, root: Path, **over) -> list[str]:
    path = write_recipe(tmp_path / "r.yaml", _recipe(root, **over))
    return ["fit", "--config", str(path), "--run.root", str(tmp_path / "runs"), "--run.name", "run",
            "--run.wandb", "false"]


# ---------------------------------------------------------------------------------- start-up
def _rm_files(folder: Path):
    for p in folder.iterdir():
        p.unlink()


# id: (change the copied folder, the line's text given the root; recipe overrides)
STARTUP = {
    "missing-root": (lambda r: shutil.rmtree(r),
                     lambda r: f"{r}: data root not found; pass data.root=DIR with DIR/train/<class>/ and DIR/val/<class>/"),
    "missing-split": (lambda r: shutil.rmtree(r / "val"),
                      lambda r: f"{r}/val: missing; the data root needs train/<class>/ and val/<class>/ folders"),
    "empty-split": (lambda r: [shutil.rmtree(p) for p in (r / "val").iterdir()],
                    lambda r: f"{r}/val: no class folders; expected {r}/val/<class>/<image>.JPEG"),
    "empty-class": (lambda r: _rm_files(r / "train" / "c1"),
                    lambda r: f"{r}/train/c1: empty class folder; put its images there or remove the folder"),
    "mismatched-classes": (lambda r: (r / "val" / "c1").rename(r / "val" / "c9"),
                           lambda r: f"{r}: class folders differ between train/ and val/ (only in train: c1; only in "
                                     "val: c9); both splits need the same class folders"),
    "non-image-file": (lambda r: (r / "train" / "c0" / "notes.txt").write_text("x"),
                       lambda r: f"{r}/train/c0/notes.txt: not an image file (extensions read: .jpg .jpeg"),
    "symlink-loop-file": (lambda r: os.symlink("x.JPEG", r / "train" / "c0" / "x.JPEG"),
                          lambda r: f"{r}/train/c0/x.JPEG: broken symlink (its target is missing or it is a symlink "
                                    "loop); fix or remove it"),
    "symlink-loop-in-class": (lambda r: os.symlink("..", r / "train" / "c0" / "up"),
                              lambda r: f"{r}/train/c0/up: a folder inside a class folder; images go directly in "
                                        "train/<class>/"),
    "symlink-loop-class": (lambda r: os.symlink(".", r / "train" / "loop"),
                           lambda r: f"{r}/train/loop: symlink loop (points to {r}/train, which contains it); "
                                     "remove the link"),
    "count-differs": (lambda r: None, lambda r: f"{r} does not hold what the recipe states: data.train_images 99 (the "
                                                f"folder: 8); pass --data.train_images 8, or set it in the recipe",
                      {"train_images": 99}),
    "classes-differ-from-model": (lambda r: [shutil.copytree(r / s / "c0", r / s / "c2") for s in ("train", "val")],
                                  lambda r: "model.num_classes: 2, but data.root holds 3 class folders "
                                            "(data.num_classes: null counts them); the model's class count follows "
                                            "data.num_classes: remove model.num_classes from the recipe"),
}


@pytest.mark.parametrize("row", list(STARTUP))
def test_layout_error_stops_at_start_up_naming_the_path(row, template, tmp_path, capsys, untouched):
    change, says, *over = STARTUP[row]
    root = tmp_path / "data"
    shutil.copytree(template, root)
    change(root)
    args = _fit_args(tmp_path, root, **(over[0] if over else {}))
    capsys.readouterr()
    rc = run_cli(*args)
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("resnet-lamb: error: ") and says(root) in lines[0], lines[0]
    assert out.out == "", "refused before the plan is printed"
    assert not untouched and not (tmp_path / "runs").exists()
    if row != "classes-differ-from-model":  # the data module's own check (at setup) says the same
        with pytest.raises(DataError) as err:
            ImageDataModule(backend="torchvision", root=str(root), global_batch=4, micro_batch=4,
                            **(over[0] if over else {})).setup("fit")
        assert str(err.value) in lines[0]


# ---------------------------------------------------------------------------------- bad files
def _jpeg_bytes(template: Path) -> bytes:
    return (template / "train" / "c1" / "0.JPEG").read_bytes()


def _zero_header(b: bytes) -> bytes:
    return b[:2] + b"\0" * 60 + b[62:]


# id: new bytes for train/c1/1.JPEG (from a good JPEG's bytes), the reason the warning gives
BAD_FILES = {
    "corrupt-jpeg": (_zero_header, "PIL cannot decode it"),
    # Pillow refuses any truncation, even one that loses only the end-of-image marker: skipped
    "truncated-jpeg": (lambda b: b[:-2], "PIL cannot decode it"),
    "truncated-jpeg-half": (lambda b: b[: len(b) // 2], "PIL cannot decode it"),
    "not-an-image-inside": (lambda b: b"this is not an image", "PIL cannot decode it"),
    "empty-file": (lambda b: b"", "PIL cannot decode it"),
}


def _warnings_for(err: str, path: Path) -> list[str]:
    return [line for line in err.splitlines() if str(path) in line]


def _skipped_in_checkpoint(run: Path) -> list[str]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["ImageDataModule"]["skipped"]


@pytest.mark.parametrize("row", list(BAD_FILES))
def test_bad_image_is_skipped_and_counted(row, template, tmp_path, capsys):
    make, why = BAD_FILES[row]
    root = tmp_path / "data"
    shutil.copytree(template, root)
    bad = root / "train" / "c1" / "1.JPEG"
    bad.write_bytes(make(_jpeg_bytes(template)))
    capsys.readouterr()
    assert run_cli(*_fit_args(tmp_path, root)) == 0
    warned = _warnings_for(capsys.readouterr().err, bad)
    assert warned == [f"resnet-lamb: warning: {bad}: corrupt or unreadable image ({why}); skipped for the rest of "
                      "the run (label -1); replace the file"]
    assert _skipped_in_checkpoint(tmp_path / "runs" / "run") == [str(bad)]


# ---------------------------------------------------------------------------------- permissions
SCRIPT = Path(sys.executable).with_name("resnet-lamb")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "resnet_lamb"]


def _fit_unprivileged(unprivileged, template, tmp_path, make_unreadable):
    root = tmp_path / "data"
    shutil.copytree(template, root)
    target = make_unreadable(root)
    proc = subprocess.run([*COMMAND, *_fit_args(tmp_path, root)], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600, **unprivileged)
    return proc, target


def test_unreadable_folder_stops_at_start_up_naming_it(unprivileged, template, tmp_path):
    def lock(root):
        os.chmod(root / "train" / "c1", 0o000)
        return root / "train" / "c1"

    proc, target = _fit_unprivileged(unprivileged, template, tmp_path, lock)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"resnet-lamb: error: {target}: permission denied; make the data readable by this user "
                     f"(chmod -R a+rX {target})"]
    assert not (tmp_path / "runs").exists()


READ_ONE_EPOCH = """
import sys
from resnet_lamb.data import ImageDataModule
dm = ImageDataModule(backend="torchvision", root=sys.argv[1], global_batch=4, micro_batch=4, image_size=16, workers=0)
dm.setup("fit")
labels = [int(y) for _, ys in dm.train_dataloader() for y in ys]
print(sum(y >= 0 for y in labels), len(labels), dm.skipped)
"""


def test_unreadable_image_is_skipped_and_counted_naming_it(unprivileged, template, tmp_path):
    """At decode time, as a corrupt image is (no start-up check can see permissions without a syscall
    per file); the warning says why and how to fix it. The data module in a subprocess (the
    skip-and-count path through `fit` is the same as the rows above)."""
    root = tmp_path / "data"
    shutil.copytree(template, root)
    target = root / "train" / "c1" / "1.JPEG"
    os.chmod(target, 0o000)
    proc = subprocess.run([sys.executable, "-c", READ_ONE_EPOCH, str(root)], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, **unprivileged)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _warnings_for(proc.stderr, target) == [
        f"resnet-lamb: warning: {target}: corrupt or unreadable image (permission denied); skipped for the rest of "
        "the run (label -1); make it readable by this user (chmod a+r)"]
    assert proc.stdout.split() == ["7", "8", f"['{target}']"]
