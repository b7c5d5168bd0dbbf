"""Two ranks (gloo on 127.0.0.1): every train image once per epoch and every val image once, across ranks,
from a folder (listed by rank 0 only, the listing shared) and from tar shards read by byte offset."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from resnet_lamb.data import dali as dali_backend

WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    import resnet_lamb.data.folder as folder
    from resnet_lamb.data import ImageDataModule
    root, backend, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    listings = []
    real = folder.validate_root
    folder.validate_root = lambda *a, **k: listings.append(a) or real(*a, **k)
    dist.init_process_group("gloo")
    dm = ImageDataModule(backend=backend, root=root, global_batch=4, micro_batch=1, image_size=16, workers=1, seed=1,
                         epoch_mode=mode)
    dm.setup("fit")  # world size and rank from torch.distributed
    out = {"world": dm.world_size, "rank": dm.global_rank, "accumulation": dm.accumulation, "kind": dm._folder.kind,
           "listings": len(listings), "opened": [],
           "train_len": len(dm.train_dataloader()), "val_len": len(dm.val_dataloader()), "train": [], "val": []}
    for epoch in range(2):
        out["train"].append(torch.cat([y for _, y in dm.train_dataloader()]).tolist())
        out["opened"].append(getattr(dm._folder.splits["train"], "opened", None))
    out["val"] = torch.cat([y for _, y in dm.val_dataloader()]).tolist()
    gathered = [None, None]
    dist.all_gather_object(gathered, out)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(gathered))
    dist.destroy_process_group()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# each backend reads both layouts and both epoch modes (the sampler is one function for every layout)
@pytest.mark.parametrize("backend, layout, mode", [("dali", "folder", "padded"), ("dali", "shards", "full_batch"),
                                                   ("torchvision", "shards", "padded"),
                                                   ("torchvision", "folder", "full_batch")])
def test_two_ranks_count_every_image_once(tmp_path, backend, layout, mode):
    if backend == "dali" and not dali_backend.available():
        pytest.skip("nvidia-dali not installed")
    # one image per class in each split: the label identifies the image; 9 images, an odd number
    rng = np.random.default_rng(0)
    folder = tmp_path / "folder"
    for split in ("train", "val"):
        for c in range(9):
            d = folder / split / f"k{c}"
            d.mkdir(parents=True)
            Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(d / "a.JPEG")
    root = folder
    if layout == "shards":  # two or three images per shard
        from resnet_lamb.data.pack import pack

        root = tmp_path / "shards"
        pack(folder, root, shard_size=3 * 1024, quiet=True)
        n_shards = len(list((root / "train").glob("*.tar")))
        assert n_shards >= 3
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script), str(root), backend, mode], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=150) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    result = json.loads(outs[0][0].split("RESULT ", 1)[1])
    assert [r["rank"] for r in result] == [0, 1] and all(r["world"] == 2 for r in result)
    # ceil(9 / 4) = 3 steps x accumulation 2 micro-batches of 1 on every rank; val ceil(9 / 2) = 5 on both
    assert all(r["accumulation"] == 2 and r["train_len"] == 6 and r["val_len"] == 5 for r in result)
    if mode == "full_batch":
        # stream order: step s, accumulation a, rank r (micro batch 1): 2 epochs of 3 full steps = 24
        # positions, passes of 9 each a permutation, no padding
        stream = [result[r]["train"][e][2 * s + a] for e in range(2) for s in range(3) for a in range(2)
                  for r in range(2)]
        assert len(stream) == 24 and -1 not in stream
        assert sorted(stream[:9]) == sorted(stream[9:18]) == list(range(9)) and stream[:9] != stream[9:18]
    else:
        for epoch in range(2):
            labels = result[0]["train"][epoch] + result[1]["train"][epoch]
            assert sorted(x for x in labels if x >= 0) == list(range(9)) and labels.count(-1) == 3
        assert result[0]["train"][0] != result[0]["train"][1]  # reshuffled per epoch
    val = result[0]["val"] + result[1]["val"]
    assert sorted(x for x in val if x >= 0) == list(range(9)) and val.count(-1) == 1
    assert [r["kind"] for r in result] == [layout, layout]
    if layout == "folder":  # no index: rank 0 lists, rank 1 takes its listing
        assert [r["listings"] for r in result] == [1, 0]
    else:  # shards: a reading process opens a shard once, when it first reads from it, and keeps it open
        assert [r["listings"] for r in result] == [0, 0]
        if backend == "dali":  # read in this process (torchvision's worker processes keep their own count)
            assert all(0 < r["opened"][0] <= r["opened"][1] <= n_shards for r in result), result
