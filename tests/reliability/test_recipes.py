"""Issue 7, item 3: malformed recipes; issue 11, items 3 and 7: an ImageNet recipe on small data, and
recipe / data / run-folder errors before torch is imported, naming the flag that caused them.

One table, one row per fault. Every row goes through `resnet-lamb fit` (in this process, the CLI's
own entry point): exit status 2, exactly one stderr line ``resnet-lamb: error: ...`` naming the key
and the problem, nothing built (no network, no data loader, no run folder).
The rows that ``plan`` checks (everything but LightningCLI's own keys and flags) also go through
`resnet-lamb plan`. A few rows run as real processes, both commands side by side, as a user runs them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, tiny_recipe, write_recipe

HANG_SECONDS = 600  # a guard against a hung process only; how fast errors come is benchmarks' business

DROP = object()  # delete the key
RAW = "raw"  # the recipe file is this text


def _edit(**changes) -> dict:
    """tiny_recipe(None) with ``a__b__c=value`` changes (``DROP`` deletes)."""
    recipe = tiny_recipe(None)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = recipe
        for key in parents:
            node = node.setdefault(key, {})
        if value is DROP:
            node.pop(leaf)
        else:
            node[leaf] = value
    return recipe


# id: (recipe dict | (RAW, text) | None = no file, fit flags, what `fit` says, what `plan` says: SAME (fit's
# words: one validator), other words, or None)
# `plan` reads the recipe alone: LightningCLI's keys (data.bogus, model.arch, data.backend...) are
# fit's to check; for rows with flags there is no `plan` equivalent.
SAME = "the same as fit"
ROWS = {
    # unknown keys
    # one wording, from one check (resnet_lamb.recipe.check_keys), in `fit` and `plan` alike
    "unknown-top-level-key": (_edit(bogus=1), [],
                              "r.yaml: bogus: unknown key; allowed: base, expected, sources, seed_everything",
                              SAME),
    "unknown-model-key-flag": (_edit(), ["--model.foo", "1"],
                               "--model.foo 1: unknown key; allowed: arch, small_input, label_smoothing", None),
    "unknown-data-key": (_edit(data__bogus=1), [], "r.yaml: data.bogus: unknown key; allowed: backend, root, ", None),
    "mistyped-data-key-flag": (_edit(), ["--data.micro_bach", "8"],
                               "--data.micro_bach 8: unknown key (did you mean micro_batch?); allowed: backend", None),
    "unknown-optimizer-key": (_edit(model__optimizer__nme="lamb"), [],
                              "model.optimizer.nme: unknown key (did you mean name?); allowed: name, base_lr",
                              SAME),
    "mistyped-key": (_edit(model__optimizer__base_lrr=0.1), [],
                     "model.optimizer.base_lrr: unknown key (did you mean base_lr?); allowed: name, base_lr, base_batch",
                     SAME),
    "unknown-schedule-key": (_edit(model__schedule__powr=2.0), [], "model.schedule.powr: unknown key (did you mean power?)",
                             SAME),
    # wrong types
    "wrong-type-epochs": (_edit(trainer__max_epochs="two"), [], "trainer.max_epochs: expected a positive integer, got 'two'",
                          SAME),
    "wrong-type-epochs-flag": (_edit(), ["--trainer.max_epochs", "abc"],
                               "--trainer.max_epochs abc: expected a positive integer, got 'abc'", None),
    "wrong-type-lightning-flag": (_edit(), ["--trainer.log_every_n_steps", "abc"],
                                  "trainer.log_every_n_steps: expected int or null, got 'abc'", None),  # LightningCLI's key
    "wrong-type-batch": (_edit(data__global_batch="512x"), [], "data.global_batch: expected a positive integer, got '512x'",
                         SAME),
    "wrong-type-lr": (_edit(model__optimizer__base_lr="fast"), [],
                      "model.optimizer.base_lr: expected a positive finite number, got 'fast'",
                      SAME),
    "negative-lr-flag": (_edit(), ["--model.optimizer.base_lr", "-1"],
                         "--model.optimizer.base_lr -1: expected a positive finite number, got -1", None),
    # unknown names
    "unknown-optimizer": (_edit(model__optimizer__name="lamm"), [],
                          "model.optimizer.name: unknown optimizer 'lamm' (did you mean 'lamb'?); choose one of lamb, ",
                          SAME),
    "unknown-optimizer-flag": (_edit(), ["--model.optimizer.name", "lamm"],
                               "--model.optimizer.name lamm: unknown optimizer 'lamm' (did you mean 'lamb'?)", None),
    "unknown-optimizer-option-flag": (_edit(), ["--model.optimizer.kwargs", '{"momentum": 0.9}'],
                                      "model.optimizer.kwargs.momentum: unknown option for optimizer 'lamb'", None),
    "unknown-backend": (_edit(data__backend="dalli"), [],
                        "data.backend: unknown backend 'dalli'; choose one of dali, torchvision", None),
    "unknown-schedule": (_edit(model__schedule__name="cosine"), [],
                         "model.schedule.name: unknown schedule 'cosine'; choose one of poly, poly_after_warmup, goyal, constant",
                         SAME),
    "unknown-schedule-flag": (_edit(), ["--model.schedule.name", "pol"],
                              "--model.schedule.name pol: unknown schedule 'pol' (did you mean 'poly'?)", None),
    "unknown-arch-flag": (_edit(), ["--model.arch", "resnet7"],
                          "--model.arch resnet7: unknown architecture 'resnet7'; choose one of resnet18, ", None),
    # batch sizes
    "negative-batch": (_edit(data__global_batch=-32), [], "data.global_batch: expected a positive integer, got -32",
                       SAME),
    "zero-micro-batch": (_edit(data__micro_batch=0), [], "data.micro_batch: expected a positive integer, got 0",
                         SAME),
    "micro-over-global": (_edit(data__micro_batch=64), [],
                          "data.micro_batch: 64 is larger than data.global_batch 32; valid data.micro_batch values "
                          "for world size 1: 1, 2, 4, 8, 16, 32",
                          "data.micro_batch: 64 is larger than data.global_batch 32"),
    "non-dividing": (_edit(data__micro_batch=12), [],
                     "data.global_batch: 32 is not divisible by data.micro_batch 12 x world size 1 = 12; valid "
                     "data.micro_batch values for world size 1: 1, 2, 4, 8, 16, 32",
                     "data.global_batch: 32 is not divisible by data.micro_batch 12 x world size 1 = 12"),
    "non-dividing-flag": (_edit(), ["--data.micro_batch", "12"],
                          "data.global_batch: 32 is not divisible by data.micro_batch 12", None),
    # schedule and LR
    "warmup-longer-than-training": (
        _edit(model__schedule__warmup_epochs=3, model__schedule__warmup_scaling="none"), [],
        "model.schedule.warmup_epochs: 3 epochs, longer than training (trainer.max_epochs 2); shorten the warmup",
        "model.schedule.warmup_epochs: 3 epochs, longer than training (trainer.max_epochs 2)"),
    "warmup-scaled-past-training": (
        _edit(model__schedule__warmup_epochs=0.5, model__optimizer__base_batch=4), [],
        "model.schedule.warmup_epochs: 0.5 epochs at model.optimizer.base_batch 4 scale linearly to 4 epochs at "
        "data.global_batch 32, longer than training (trainer.max_epochs 2)",
        "scale linearly to 4 epochs at data.global_batch 32, longer than training"),
    "end-lr-above-peak": (_edit(model__schedule__end_lr=0.1), [],
                          "model.schedule.end_lr: 0.1 is above the peak LR 0.01 (model.optimizer.base_lr 0.01 x (32/32)^1/2); "
                          "set model.schedule.end_lr to at most 0.01",
                          "model.schedule.end_lr: 0.1 is above the peak LR 0.01"),
    # issue 12: ghost BatchNorm and the epoch mode
    "bn-batch-not-dividing": (_edit(model__bn_batch=12), [],
                              "model.bn_batch: 12 does not divide data.micro_batch 16 (ghost BatchNorm normalises over "
                              "groups of model.bn_batch samples of each micro batch); set model.bn_batch to one of 1, 2, "
                              "4, 8, 16 or data.micro_batch to a multiple of 12",
                              "model.bn_batch: 12 does not divide data.micro_batch 16"),
    "bn-batch-not-dividing-flag": (_edit(model__bn_batch=8), ["--data.micro_batch", "4", "--model.bn_batch", "3"],
                                   "--model.bn_batch 3: 3 does not divide data.micro_batch 4", None),
    "unknown-epoch-mode": (_edit(data__epoch_mode="fullbatch"), [],
                           "data.epoch_mode: unknown epoch mode 'fullbatch' (did you mean 'full_batch'?); choose one of "
                           "padded, full_batch",
                           "data.epoch_mode: unknown epoch mode 'fullbatch' (did you mean 'full_batch'?)"),
    "sources-unknown-key": (_edit(sources={"model.optimizer.base_l": "Table 5"}), [],
                            "sources.model.optimizer.base_l: names no key this recipe sets",
                            SAME),
    "missing-base-lr": (_edit(model__optimizer__base_lr=DROP), [],
                        "model.optimizer.base_lr: missing; set the peak LR at model.optimizer.base_batch",
                        SAME),
    "missing-optimizer-name": (_edit(model__optimizer__name=DROP), [],
                               "model.optimizer.name: missing; set the optimizer",
                               SAME),
    # expected accuracies
    "expected-top1-percent": (_edit(expected={"top1": 76.96}), [],
                              "expected.top1: expected a fraction in [0, 1], got 76.96 (accuracies are fractions: "
                              "write 0.7696)",
                              "expected.top1: expected a fraction in [0, 1], got 76.96"),
    "expected-top5-negative": (_edit(expected={"top5": -0.1}), [], "expected.top5: expected a fraction in [0, 1], got -0.1",
                               SAME),
    # the file itself
    "yaml-syntax-error": ((RAW, "trainer: {max_epochs: 2}\nmodel: {optimizer: {name: lamb\n"), [],
                          "r.yaml:3:1: YAML syntax error: while parsing a flow mapping expected ',' or '}'",
                          "r.yaml:3:1: YAML syntax error"),
    "empty-file": ((RAW, ""), [], "r.yaml: empty recipe; expected a YAML mapping", "r.yaml: empty recipe"),
    "comment-only-file": ((RAW, "# nothing here\n"), [], "r.yaml: empty recipe", SAME),
    "missing-base": ((RAW, "base: ../nowhere/base.yaml\n" + yaml.safe_dump(tiny_recipe(None))), [],
                     "r.yaml: base: ", "not found; fix the base path"),
    "missing-file": (None, [], "r.yaml: recipe file not found", SAME),
}


def _write(folder: Path, row) -> Path:
    recipe = ROWS[row][0]
    path = folder / "r.yaml"
    if recipe is None:
        return path
    if isinstance(recipe, tuple):
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(recipe[1])
        return path
    return write_recipe(path, recipe)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("resnet-lamb: error: "), lines[0]
    return lines[0]


def test_the_matrix_covers_the_issue():
    """Issue 7 item 3's list and issue 12's three, each kind at least once, and at least 15 rows."""
    kinds = ["unknown-top-level-key", "wrong-type-batch", "unknown-optimizer", "unknown-backend", "unknown-schedule",
             "negative-batch", "zero-micro-batch", "micro-over-global", "non-dividing", "warmup-longer-than-training",
             "missing-base-lr", "expected-top1-percent", "yaml-syntax-error", "empty-file",
             "bn-batch-not-dividing", "unknown-epoch-mode", "end-lr-above-peak"]  # issue 12
    assert set(kinds) <= set(ROWS) and len(ROWS) >= 15


@pytest.mark.parametrize("row", list(ROWS))
def test_fit_refuses_a_malformed_recipe_in_one_line(row, tmp_path, capsys, untouched):
    _, flags, says, _ = ROWS[row]
    path = _write(tmp_path, row)
    runs = tmp_path / "runs"
    capsys.readouterr()
    rc = run_cli("fit", "--config", str(path), "--run.root", str(runs), "--run.wandb", "false", *flags)
    out = capsys.readouterr()
    assert rc == 2
    line = _one_error_line(out.err)
    assert says in line, line
    assert out.out == "", "the plan is printed only for a valid recipe"
    assert not untouched, f"built before the error: {untouched}"
    assert not runs.exists(), "no run folder for a refused recipe"


def plan_says(row: str) -> str:
    return ROWS[row][2] if ROWS[row][3] is SAME else ROWS[row][3]


PLAN_ROWS = [row for row, (_, flags, _, plan_says) in ROWS.items() if plan_says is not None and not flags]


@pytest.mark.parametrize("row", PLAN_ROWS)
def test_plan_refuses_a_malformed_recipe_in_one_line(row, tmp_path, capsys, monkeypatch):
    from resnet_lamb.cli import main

    path = _write(tmp_path, row)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = main(["plan", "--config", path.name])
    out = capsys.readouterr()
    assert rc == 2
    line = _one_error_line(out.err)
    assert line.startswith("resnet-lamb: error: r.yaml") and plan_says(row) in line, line
    assert out.out == ""


SCRIPT = Path(sys.executable).with_name("resnet-lamb")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "resnet_lamb"]
PROCESS_ROWS = ["mistyped-key", "non-dividing", "yaml-syntax-error"]


def test_a_real_process_exits_with_one_line(tmp_path):
    """`resnet-lamb fit` and `plan` as a user runs them, for a few rows at once: exit 2, one line (that it
    comes before torch is imported is test_errors_come_before_torch_is_imported's)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = {}
    for row in PROCESS_ROWS:
        folder = tmp_path / row
        _write(folder, row)
        for command in ("fit", "plan"):
            extra = ["--run.root", str(folder / "runs"), "--run.wandb", "false"] if command == "fit" else []
            procs[row, command] = subprocess.Popen(
                [*COMMAND, command, "--config", "r.yaml", *extra], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for (row, command), proc in procs.items():
        stdout, stderr = proc.communicate(timeout=HANG_SECONDS)
        assert proc.returncode == 2, (row, command, stderr[-2000:])
        line = _one_error_line(stderr)
        says = ROWS[row][2] if command == "fit" else plan_says(row)
        assert says in line, line
        assert stdout == ""
        assert not (tmp_path / row / "runs").exists()


# ------------------------------------------------------------------ issue 11: before torch, and blame
# A fresh process runs `resnet-lamb fit` through the console script's entry (resnet_lamb.cli.main) and
# reports, at exit, whether torch or Lightning had been imported when the error line was printed.
PROBE = r"""
import json, sys
from resnet_lamb.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules, "lightning": "lightning" in sys.modules}))
"""

# id: (fit flags after the recipe, what the one line says)
EARLY = {
    "negative-micro-batch-flag": (["--data.micro_batch", "-8"], "error: --data.micro_batch -8: expected a positive integer"),
    "unknown-optimizer": (["--model.optimizer.name", "lamm"], "--model.optimizer.name lamm: unknown optimizer 'lamm'"),
    "missing-data-root": (["--data.root", "{tmp}/nowhere"], "{tmp}/nowhere: data root not found"),
    "non-dividing-flag": (["--data.micro_batch", "12"],
                          "r.yaml with --data.micro_batch 12: data.global_batch: 32 is not divisible by data.micro_batch 12"),
    "counts-differ": (["--data.train_images", "1000", "--data.num_classes", "7"],
                      "data.train_images 1000 (the folder: 80), data.num_classes 7 (the folder: 10)"),
    "resume-mistyped-run": (["--run.name", "nope", "--ckpt_path", "last"], "ckpt_path: last, but {tmp}/runs/nope has no"),
}


def test_fit_errors_come_before_torch_is_imported(tmp_path, digits_root):
    """Issue 11 item 7: recipe, data and run-folder errors of `fit` (the recipe with the command line
    applied: tiny_recipe holds optimizer kwargs, checked last) are printed before torch or Lightning
    is imported; an error a flag caused names the flag, not the recipe file."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(digits_root))
    env = dict(os.environ, PYTHONWARNINGS="ignore", WANDB_MODE="offline")
    procs = {}
    for row, (flags, _) in EARLY.items():
        flags = [f.format(tmp=tmp_path) for f in flags]
        procs[row] = subprocess.Popen(
            [sys.executable, "-c", PROBE, "fit", "--config", str(path), "--run.root", str(tmp_path / "runs"),
             "--run.wandb", "false", *flags], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for row, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=HANG_SECONDS)
        line = _one_error_line(stderr)
        assert EARLY[row][1].format(tmp=tmp_path) in line, line
        assert str(path) not in line or row == "non-dividing-flag", line  # the flag's error, not the recipe's
        seen = json.loads(stdout.splitlines()[-1])
        assert seen == {"rc": 2, "torch": False, "lightning": False}, (row, seen)
    assert not (tmp_path / "runs").exists()


def test_a_later_config_file_is_named_for_its_value(tmp_path, capsys):
    """A bad value from a second --config file is blamed on that file, not on the recipe."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(None))
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  micro_batch: -8\n")
    capsys.readouterr()
    rc = run_cli("fit", "--config", str(path), "--config", str(extra), "--run.root", str(tmp_path / "runs"))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line == f"resnet-lamb: error: {extra}: data.micro_batch: expected a positive integer, got -8"


def test_imagenet_recipe_on_small_data_one_message_then_its_fix_runs(tmp_path, capsys, digits_root):
    """Issue 11 item 3: an ImageNet recipe on a small folder names every count that differs in one
    line; the flags it gives are all it takes (model.num_classes follows data.num_classes); a
    --model.num_classes flag is refused before anything is built, naming both keys."""
    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "imagenet" / "table5" / "lamb-bs512.yaml")
    base = ["fit", "--config", recipe, "--data.root", str(digits_root), "--data.backend", "torchvision",
            "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"]
    capsys.readouterr()
    assert run_cli(*base) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert (f"{digits_root} does not hold what the recipe states: data.train_images 1281167 (the folder: 80), "
            "data.val_images 50000 (the folder: 40), data.num_classes 1000 (the folder: 10); pass "
            "--data.train_images 80 --data.val_images 40 --data.num_classes 10, or set them in the recipe") in line
    advice = line.split("; pass ", 1)[1].split(", or", 1)[0].split()
    assert run_cli(*base, *advice, "--model.num_classes", "10") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--model.num_classes 10: follows data.num_classes" in line and "pass --data.num_classes 10 instead" in line
    assert not (tmp_path / "runs").exists()
    small = ["--data.image_size", "16", "--data.global_batch", "16", "--data.micro_batch", "16", "--model.bn_batch", "16",
             "--data.workers", "0",
             "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    assert run_cli(*base, *advice, *small) == 0
    import torch

    run = tmp_path / "runs" / "lamb-bs512"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert tuple(ckpt["state_dict"]["model.fc.weight"].shape) == (10, 2048)  # ResNet-50 with the data's 10 classes
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert (data["train_images"], data["val_images"], data["num_classes"]) == (80, 40, 10)  # recorded for `report`
