"""Known-bad image files are remembered per run (issue 14, item 5): a file a DataLoader worker
process found corrupt is known to the other workers and to the main process (shared memory), so
it is decoded once per run and warned about once. (Across ranks and into the checkpoint:
tests/test_ddp_step.py.)"""
from __future__ import annotations

import os

import torch

from test_data_backends import dm_for, make_folder


def test_a_bad_file_found_by_one_worker_is_known_to_all(tmp_path, capfd):
    root = make_folder(tmp_path, classes=3, train_per=4, val_per=1, size=(32, 24))
    bad = os.path.join(root, "train", "c02", "1.JPEG")
    open(bad, "wb").write(b"not an image")
    dm = dm_for(root, "torchvision", workers=2)
    loader = dm.train_dataloader()
    index = [loader.split.path(i) for i in range(len(loader.split))].index(bad)
    assert index not in loader._dataset.bad
    for _ in range(3):
        labels = torch.cat([y for _, y in loader])
        assert (labels >= 0).sum() == 11
    assert index in loader._dataset.bad, "the worker's find is in the shared set the main process holds"
    assert list(loader._dataset.bad) == [index]
    assert dm.skipped == [bad] and capfd.readouterr().err.count(bad) == 1
