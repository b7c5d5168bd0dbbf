"""Per-step decisions and logging under DDP (issue 14, items 3-4): one real 2-process torchrun run on
the CPU (gloo, 127.0.0.1), accumulation 2, with ``model.nonfinite: skip``:

- only rank 1 sees a NaN loss at step 2 (its gradients stay finite): both ranks skip that step
  (the flag is summed over the ranks before the decision), and their weights stay identical;
- ``train/loss`` in the CSV is, at every step, the mean over the global batch: the loss sums of both
  ranks' two micro-batches divided by their count of real samples (the last step of an epoch is
  partly padding), one value per optimizer step;
- the trainer runs DDP with ``gradient_as_bucket_view`` and the recipe's bucket size;
- only rank 1 gets SIGUSR1, during step 5: both ranks save and stop after step 5, torchrun exits 0;
- a corrupt image that only rank 1 reads in epoch 0 is known to both ranks afterwards and listed in
  the checkpoint rank 0 writes; one warning.
"""
from __future__ import annotations

import json
import math

import pytest

from conftest import read_csv, tiny_recipe, write_recipe
from test_launch import _fail_msg, torchrun


def _corrupt_a_file_of_rank_1(root):
    """Overwrite the first real image rank 1 reads in epoch 0 (the recipe's plan) with text."""
    from resnet_lamb.data.folder import validate_root
    from resnet_lamb.data.sampling import epoch_plan, plan_kwargs

    split = validate_root(root).splits["train"]
    index, real = epoch_plan(len(split), **plan_kwargs(True, 32, 8, 2, 1, 0), epoch=0)
    path = split.path(int(index[real][0]))
    with open(path, "wb") as f:
        f.write(b"not an image")
    return path


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, digits_root):
    import shutil

    base = tmp_path_factory.mktemp("ddp")
    root = base / "data"
    shutil.copytree(digits_root, root)
    bad = _corrupt_a_file_of_rank_1(root)
    recipe = tiny_recipe(root, **{"model.arch": "mlp", "model.mlp_hidden": [32], "model.nonfinite": "skip",
                                         "data.global_batch": 32, "data.micro_batch": 8,
                                         "trainer.enable_progress_bar": False})
    recipe["trainer"]["callbacks"] = [{"class_path": "ddp_helpers.StepRecorder",
                                       "init_args": {"out": str(base / "rec"), "nan_rank": 1, "nan_step": 2,
                                                     "signal_rank": 1, "signal_step": 5}}]
    path = write_recipe(base / "r.yaml", recipe)
    p = torchrun(path, "--run.root", str(base / "runs"), "--run.name", "d", "--run.wandb", "false",
                 "--run.ddp_bucket_mb", "7", NPROC=2)
    assert p.returncode == 0, _fail_msg(p)
    records = [json.loads((base / "rec" / f"rank{r}.json").read_text()) for r in range(2)]
    return {"proc": p, "records": records, "dir": base / "runs" / "d", "bad": bad}


def test_nan_on_one_rank_is_skipped_by_both(ddp_run):
    a, b = ddp_run["records"]
    assert a["skipped"] == b["skipped"]
    assert dict(a["skipped"])[2] == 1 and dict(a["skipped"])[1] == 0, a["skipped"]
    assert a["weights"] == b["weights"], "the replicas drifted apart"
    nan_steps = {s for s, value, _ in b["micro"] if math.isnan(value)}
    assert nan_steps == {1} and not any(math.isnan(v) for _, v, _ in a["micro"]), "only rank 1 saw the NaN"
    warnings = [ln for ln in ddp_run["proc"].stderr.splitlines() if "step skipped" in ln]
    assert len(warnings) == 1 and "train/loss is nan at optimizer step 2 of 6" in warnings[0], warnings


def test_train_loss_is_the_global_batch_mean_once_per_step(ddp_run):
    sums: dict[int, list[float]] = {}
    for rec in ddp_run["records"]:
        for step, loss_sum, count in rec["micro"]:
            s = sums.setdefault(step, [0.0, 0])
            s[0] += loss_sum
            s[1] += count
    rows = [r for r in read_csv(ddp_run["dir"]) if r.get("train/loss")]
    logged = {int(r["step"]): float(r["train/loss"]) for r in rows}
    assert len(rows) == len(logged) == 5, "one train/loss row per optimizer step"
    counts = {step: s[1] for step, s in sums.items()}
    # epoch 0: 80 images less the corrupt one (rank 1, step 0); its last step is half padding
    assert (counts[0], counts[1], counts[2]) == (31, 32, 16), counts
    for step, value in logged.items():
        want = sums[step][0] / sums[step][1]
        if step == 1:
            assert math.isnan(value)
        else:
            assert value == pytest.approx(want, rel=1e-6), (step, value, want)


def test_ddp_strategy_with_bucket_view_and_recipe_bucket_size(ddp_run):
    for rec in ddp_run["records"]:
        assert rec["strategy"]["class"] == "DDPStrategy"
        assert rec["strategy"]["ddp_kwargs"] == {"gradient_as_bucket_view": True, "bucket_cap_mb": 7.0}
        assert rec["strategy"]["precision"] == "32-true"


def test_signal_on_one_rank_stops_both_after_the_same_step(ddp_run):
    assert [rec["global_step"] for rec in ddp_run["records"]] == [5, 5]
    import torch

    ckpt = torch.load(ddp_run["dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5
    lines = [ln for ln in ddp_run["proc"].stderr.splitlines() if "stopped after optimizer step" in ln]
    last = ddp_run["dir"] / "checkpoints" / "last.ckpt"
    assert lines == [f"resnet-lamb: a stop signal on another rank: stopped after optimizer step 5 (epoch 1), "
                     f"checkpoint {last}; resume with --ckpt_path last"], lines


def test_a_bad_file_found_on_one_rank_is_known_to_all_and_checkpointed(ddp_run):
    import torch

    bad = ddp_run["bad"]
    assert [rec["skipped_files"] for rec in ddp_run["records"]] == [[bad], [bad]]
    ckpt = torch.load(ddp_run["dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ImageDataModule"]["skipped"] == [bad]
    assert ddp_run["proc"].stderr.count(f"{bad}: corrupt or unreadable image") == 1
