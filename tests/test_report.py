"""`resnet-lamb report`: one real 2-epoch run per module (with W&B offline), copied with edited
configs (LAMB at 512, Adam+ and momentum at 16K, a run still in progress), each with the plan.json
fit would write for it, and damaged logs (a CSV cut mid-line, a missing val/top5 column); the report
puts each in its table with the paper's numbers read from paper_tables.yaml, takes LR and warmup
from the run's plan.json, its status from summary.json, writes valid PNGs and never crashes on a bad
folder.  The W&B API path is checked against a fake ``wandb.Api`` fed the config the real run gave
W&B and its logged rows, and, unreachable, is one error line within seconds."""
from __future__ import annotations

import csv
import importlib.resources
import json
import shutil
import socket
import time

import pytest
import yaml

from conftest import run_cli, tiny_recipe, write_recipe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _paper() -> dict:
    text = importlib.resources.files("resnet_lamb.reference").joinpath("paper_tables.yaml").read_text()
    return yaml.safe_load(text)["imagenet_resnet50"]


def _copy_run(src, dst, **edits):
    """Copy a run folder (no checkpoints, no W&B files), set dotted keys of its config.yaml and write
    the plan.json fit would have written for that config."""
    from resnet_lamb import recipe as R

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for key, value in edits.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    plan = R.plan_recipe(R.validate_recipe(R.recipe_part(cfg), dst / "config.yaml"), world_size=1)
    (dst / "plan.json").write_text(json.dumps(plan.to_dict()))
    return dst


def _summary(run_dir, status, message=""):
    """summary.json as RunStatus writes it."""
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "message": message, "global_step": 3,
                                                      "epoch": 1, "fit_seconds": 1.0, "ended": None}))


IMAGENET = {"model.arch": "resnet50", "data.backend": "dali", "data.root": "data/imagenet",
            "data.train_images": 1281167, "data.val_images": 50000, "data.num_classes": 1000}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/{tiny (real, synthetic data), lamb-bs512, lamb-bs512-resnet18, adam-goyal-16k, sgd-16k, running,
    truncated, no-top5} and, for what may share a table or a cell: lamb-bs512-{synthetic,foolbox,interrupted},
    tiny-seed1 (tiny again), tiny-ctrl-c (tiny, Ctrl-C'd before interrupted.txt existed), digits (tiny's
    recipe on another data set)."""
    tmp = tmp_path_factory.mktemp("report")
    recipe = tiny_recipe(None, expected={"top1": 0.5, "source": "test expectation"})
    path = write_recipe(tmp / "tiny.yaml", recipe)
    root = tmp / "runs"
    rc = run_cli("fit", "--config", str(path), "--run.root", str(tmp / "runs"), "--run.name", "tiny",
                 "--run.wandb", "true")  # offline (conftest)
    assert rc == 0
    import wandb

    (tmp / "wandb_config.json").write_text(json.dumps(dict(wandb.run.config)))  # what the run gave W&B
    wandb.finish()  # what the end of a `resnet-lamb fit` process does (atexit)
    tiny = root / "tiny"
    bs512 = {"data.global_batch": 512, "model.optimizer.base_batch": 512, "model.optimizer.base_lr": 0.005,
             "model.schedule.warmup_epochs": 0.3125}
    imagenet = IMAGENET  # only such runs sit beside the paper
    _copy_run(tiny, root / "lamb-bs512", **bs512, **imagenet)
    _copy_run(tiny, root / "lamb-bs512-synthetic", **bs512, **{**imagenet, "data.backend": "synthetic"})
    _copy_run(tiny, root / "lamb-bs512-foolbox", **bs512, **{**imagenet, "data.root": "data/foolbox",
                                                            "data.backend": "torchvision", "data.train_images": 20,
                                                            "data.val_images": 20, "data.num_classes": 19})
    stopped = _copy_run(tiny, root / "lamb-bs512-interrupted", **bs512, **imagenet, **{"trainer.max_epochs": 90})
    (stopped / "interrupted.txt").write_text("KeyboardInterrupt\n")  # what RunStatus writes on Ctrl-C
    _summary(stopped, "interrupted", "KeyboardInterrupt")
    _copy_run(tiny, root / "tiny-seed1")
    ctrl_c = _copy_run(tiny, root / "tiny-ctrl-c")
    (ctrl_c / "summary.json").unlink()  # a run from before summary.json and interrupted.txt
    (ctrl_c / "failed.txt").write_text("KeyboardInterrupt: \n")  # as written then
    _copy_run(tiny, root / "digits", **{"data.backend": "torchvision", "data.root": "/data/digits",
                                        "data.train_images": 80, "data.val_images": 40})
    _copy_run(tiny, root / "lamb-bs512-resnet18", **bs512)
    goyal = {**imagenet, "model.schedule.name": "goyal", "model.schedule.warmup_epochs": 0.0,
             "model.schedule.warmup_scaling": "none", "data.global_batch": 16384, "model.optimizer.kwargs": {},
             "model.optimizer.base_batch": 16384}
    _copy_run(tiny, root / "adam-goyal-16k", **{**goyal, "model.optimizer.name": "adam",
                                                "model.optimizer.base_lr": 0.002})
    _copy_run(tiny, root / "sgd-16k", **{**goyal, "model.optimizer.name": "sgd", "model.optimizer.base_lr": 6.4,
                                         "model.optimizer.kwargs": {"momentum": 0.9}})
    _summary(_copy_run(tiny, root / "running", **{"trainer.max_epochs": 5, "trainer.max_steps": 15}), "running")
    cut = _copy_run(tiny, root / "truncated") / "csv" / "metrics.csv"
    data = cut.read_bytes()
    cut.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 20])  # 20 bytes into the last line
    no5 = _copy_run(tiny, root / "no-top5") / "csv" / "metrics.csv"
    with open(no5, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(no5, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "val/top5"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out") / "out"
    assert run_cli("report", str(runs / "*"), "--out", str(out)) == 0
    text = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    return out, text, rows


def test_tables_show_the_papers_numbers(report):
    _, text, rows = report
    paper = _paper()
    assert "## Table 5" in text and "## Table 3" in text
    t5 = {r["batch"]: r for r in paper["table5_lamb"]}[512]
    row = [c.strip() for c in rows["lamb-bs512"].split("|")]
    assert f"{t5['top1']:.4f}" in row and f"{t5['top5']:.4f}" in row  # 0.7696 / 0.9335
    assert f"{t5['lr']:g}" in row and f"{t5['warmup_epochs']:g}" in row  # LR and warmup as `plan` derives them
    assert text.index("lamb-bs512") < text.index("## Table 3")
    t3 = paper["table3_16k"]
    assert f"{t3['adam_goyal']:.4f}" in rows["adam-goyal-16k"] and "adam+" in rows["adam-goyal-16k"]
    assert f"{t3['momentum']:.4f}" in rows["sgd-16k"] and "momentum" in rows["sgd-16k"]
    assert text.index("## Table 3") < text.index("adam-goyal-16k") < text.index("## Other runs")
    assert text.index("## Other runs") < text.index("lamb-bs512-resnet18")  # a proxy is not set beside ImageNet
    # the real run: other runs, grouped by optimizer x batch, with its recipe's expected
    assert "### lamb, global batch 32" in text
    assert "0.5000" in rows["tiny"] and "test expectation" in rows["tiny"] and "| complete |" in rows["tiny"]
    assert "in progress (2 of 5 epochs validated)" in rows["running"]


def test_only_imagenet_runs_sit_beside_the_paper_and_a_cell_holds_one_recipe(report, runs):
    """Issue 11 item 6: synthetic-data, foolbox and other-data runs are not set beside the paper's
    ImageNet numbers; an interrupted run is "interrupted" (no difference to the paper); a grid cell
    averages complete runs of one recipe (data set, epochs, architecture, classes, optimizer, batch)."""
    from resnet_lamb.report import load_run

    _, text, rows = report
    table5 = text[text.index("## Table 5"):text.index("## Table 3")]
    assert "| lamb-bs512 |" in table5 and "| lamb-bs512-interrupted |" in table5
    for other in ("lamb-bs512-synthetic", "lamb-bs512-foolbox", "lamb-bs512-resnet18", "tiny", "digits"):
        assert f"| {other} |" not in table5, other
    cells = [c.strip() for c in rows["lamb-bs512-interrupted"].split("|")]
    assert cells[2] == "interrupted (KeyboardInterrupt)" and cells[-3:-1] == ["-", "-"]  # no diff to the paper
    assert [c.strip() for c in rows["lamb-bs512"].split("|")][-3] != "-"
    assert load_run(runs / "tiny-ctrl-c").status == "interrupted"  # a Ctrl-C'd run is not "failed"
    assert " 0 failed" in text and " 2 interrupted" in text
    # one grid per setting: tiny and its seed copy share a cell (n=2), the Ctrl-C'd copy is counted
    top1 = load_run(runs / "tiny").final[0]
    synthetic = text[text.index("### synthetic data, resnet18, 10 classes, 2 epochs"):]
    grid = synthetic[:synthetic.index("####")]
    assert f"| lamb | {top1:.4f} ±0.0000 (n=2), 1 interrupted |" in grid, grid
    digits = text[text.index("### digits (80 train / 40 val images), resnet18, 10 classes, 2 epochs"):]
    assert f"| lamb | {top1:.4f} |" in digits[:digits.index("####")]
    assert "### synthetic data, resnet18, 10 classes, 5 epochs" in text  # "running": other epochs, own grid
    assert "### synthetic data, resnet50, 1000 classes, 2 epochs" in text  # synthetic ImageNet-sized: not ImageNet
    assert "### foolbox (20 train / 20 val images), resnet50, 19 classes, 2 epochs" in text


def test_ctrl_c_leaves_an_interrupted_run(tmp_path):
    """A real `resnet-lamb fit` stopped with SIGINT (Ctrl-C) after its first epoch: interrupted.txt,
    no failed.txt, summary.json "interrupted", plan.json, and `report` says "interrupted"."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    recipe = tiny_recipe(None, **{"model.arch": "mlp", "model.mlp_hidden": [16], "trainer.max_epochs": 500})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run = tmp_path / "runs" / "stopped"
    # as launch/torchrun.sh starts it (the plan printed there already): fit still writes plan.json
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RESNET_LAMB_PLAN_SHOWN="1")
    proc = subprocess.Popen([sys.executable, "-m", "resnet_lamb", "fit", "--config", str(path), "--run.root",
                             str(tmp_path / "runs"), "--run.name", "stopped", "--run.wandb", "false"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.ckpt").is_file():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, err[-2000:]
    failed = (run / "failed.txt").read_text() if (run / "failed.txt").is_file() else None
    assert (run / "interrupted.txt").is_file(), (sorted(p.name for p in run.iterdir()), failed, err[-3000:])
    assert (run / "interrupted.txt").read_text() == "KeyboardInterrupt\n" and not (run / "failed.txt").exists()
    assert json.loads((run / "plan.json").read_text())["optimizer"] == "lamb"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["message"]) == ("interrupted", "KeyboardInterrupt") and summary["ended"]
    out = tmp_path / "out"
    assert run_cli("report", str(run), "--out", str(out)) == 0
    line = next(ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| stopped |"))
    assert "| interrupted (KeyboardInterrupt) |" in line


def test_damaged_folders_are_incomplete(report):
    _, text, rows = report
    incomplete = text[text.index("## Incomplete runs"):]
    assert "truncated" in rows["truncated"] and "truncated" in incomplete
    assert "val/top5" in rows["no-top5"] and "no-top5" in incomplete
    assert "truncated" not in text[:text.index("## Incomplete runs")]


def test_figures_are_valid_pngs(report):
    from PIL import Image
    import matplotlib.image

    out, text, _ = report
    names = sorted(p.name for p in out.glob("*.png"))
    for want in ("accuracy_batch_32.png", "accuracy_batch_512.png", "accuracy_optimizer_lamb.png",
                 "accuracy_optimizer_adam.png", "trust_ratio_tiny.png", "trust_ratio_lamb-bs512.png"):
        assert want in names and f"({want})" in text
    assert not any("truncated" in n or "no-top5" in n for n in names)
    for name in names:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as im:
            im.verify()
        assert matplotlib.image.imread(path).ndim == 3


def test_missing_path_is_one_error_line(tmp_path, capsys):
    assert run_cli("report", str(tmp_path / "nope"), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resnet-lamb: error:") and "nope" in err[0]
    assert run_cli("report", str(tmp_path / "none-*"), "--out", str(tmp_path / "out")) == 2
    assert not (tmp_path / "out").exists()


def _same_metrics(a, b):
    assert a.val == b.val and len(a.val) == 2
    assert a.trust_layers == b.trust_layers and len(a.trust_layers) > 10
    assert a.trust_steps == b.trust_steps and a.trust_values == b.trust_values


def _report_rows(*run_dirs, out):
    assert run_cli("report", *map(str, run_dirs), "--out", str(out)) == 0
    text = (out / "report.md").read_text()
    return text, {line.split("|")[1].strip(): [c.strip() for c in line.split("|")]
                  for line in text.splitlines() if line.startswith("| ")}


def test_report_takes_lr_and_warmup_from_plan_json(runs, tmp_path):
    """The real run's folder holds the plan.json fit wrote; report shows its LR and warmup, and
    shows an edited plan.json's values (it reads them, it does not derive them again); a run
    without plan.json (older runs) shows "-" and the report says why."""
    from resnet_lamb.report import load_run

    tiny = runs / "tiny"
    plan = json.loads((tiny / "plan.json").read_text())
    assert (plan["lr"], plan["warmup_epochs"], plan["optimizer_steps"]) == (0.01, 0.5, 6)
    assert isinstance(plan["sources"], dict)  # as `plan --json` prints it
    # one plan per run: the checkpoint holds the plan the module followed, the one plan.json records
    import torch

    ckpt = torch.load(tiny / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["resnet_lamb"]["plan"] == {k: v for k, v in plan.items() if k != "sources"}
    _, rows = _report_rows(tiny, out=tmp_path / "out")
    assert rows["tiny"][4:6] == ["0.01", "0.5"]  # LR, warmup epochs
    edited = tmp_path / "runs" / "edited"
    shutil.copytree(tiny, edited, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    (edited / "plan.json").write_text(json.dumps({**plan, "lr": 0.0123457, "warmup_epochs": 7.25}))
    assert (load_run(edited).lr, load_run(edited).warmup_epochs) == (0.0123457, 7.25)
    old = tmp_path / "runs" / "old"
    shutil.copytree(edited, old)
    (old / "plan.json").unlink()
    text, rows = _report_rows(tiny, edited, old, out=tmp_path / "out2")
    assert rows["edited"][4:6] == ["0.0123457", "7.25"] and rows["edited"][6:] == rows["tiny"][6:]
    assert rows["old"][2] == "complete" and rows["old"][4:6] == ["-", "-"] and rows["old"][6:] == rows["tiny"][6:]
    assert "1 runs have no plan.json (older runs): their LR and warmup show as -." in text
    (old / "plan.json").write_text("{not json")
    broken = load_run(old)
    assert broken.status == "incomplete" and "plan.json is not valid JSON" in broken.reason


def test_summary_json_gives_the_status(runs, tmp_path):
    """summary.json (RunStatus) says how the last fit stands: complete even with fewer validated
    epochs than max_epochs (a run stopped by max_steps), failed with its message, running = in
    progress; without it (older runs) the epoch count decides."""
    from resnet_lamb.report import load_run

    summary = json.loads((runs / "tiny" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["global_step"] == 6 and summary["epoch"] == 2
    assert summary["fit_seconds"] > 0 and summary["ended"] and summary["message"] == ""
    run = _copy_run(runs / "tiny", tmp_path / "cut-short", **{"trainer.max_epochs": 5, "trainer.max_steps": 15})
    assert load_run(run).status == "complete"
    _summary(run, "running")
    assert (load_run(run).status, load_run(run).reason) == ("in progress", "2 of 5 epochs validated")
    _summary(run, "failed", "FloatingPointError: loss is nan at step 4")
    assert (load_run(run).status, load_run(run).reason) == ("failed", "FloatingPointError: loss is nan at step 4")
    (run / "summary.json").unlink()
    assert load_run(run).status == "in progress"


class _FakeRun:
    """The parts of ``wandb.apis.public.Run`` the report uses; ``scan_history(keys)`` keeps the rows
    that hold every key, as the real one documents."""

    def __init__(self, name, config, rows, state="finished"):
        self.name, self.id, self.state, self.config, self._rows = name, name + "-id", state, config, rows
        self.summary = {k: v for row in rows for k, v in row.items()}

    def scan_history(self, keys=None, page_size=1000):
        return [{k: r[k] for k in keys} for r in self._rows if all(k in r for k in keys)]


class _FakeApi:
    def __init__(self, runs):
        self._runs = runs

    def runs(self, path, **kwargs):
        assert path == "me/resnet-lamb"
        return self._runs


def _logged(run_dir):
    """What the real run gave W&B: its config (Lightning's flat hyperparameters and RunStatus's
    ``plan``, read from ``wandb.run.config`` before the run finished) and the metric rows, "step" as
    W&B's trainer/global_step, empty cells not logged."""
    config = json.loads((run_dir.parent.parent / "wandb_config.json").read_text())
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [{("trainer/global_step" if k == "step" else k): float(v) for k, v in r.items() if v}
                for r in csv.DictReader(f)]
    return config, rows


def test_wandb_api_runs_map_like_local_ones(runs):
    from resnet_lamb.report import load_run, other_sections, read_wandb_api

    local = load_run(runs / "tiny")
    config, rows = _logged(runs / "tiny")
    assert config["plan"]["lr"] == 0.01  # RunStatus gave W&B the run's plan.json
    unplanned = {k: v for k, v in config.items() if k != "plan"}
    api = _FakeApi([_FakeRun("tiny", config, rows), _FakeRun("live", config, rows[:8], state="running"),
                    _FakeRun("alien", {"lr": 0.1}, rows), _FakeRun("unplanned", unplanned, rows)])
    tiny, live, alien, old = read_wandb_api("me/resnet-lamb", api=api)
    _same_metrics(tiny, local)
    assert old.status == "complete" and (old.lr, old.warmup_epochs) == (None, None)  # "-", not derived
    assert (tiny.optimizer, tiny.schedule, tiny.global_batch, tiny.lr, tiny.warmup_epochs, tiny.status) == \
        (local.optimizer, local.schedule, local.global_batch, local.lr, local.warmup_epochs, "complete")
    assert str(tiny.path) == "wandb:me/resnet-lamb/tiny-id" and tiny.source == "W&B API me/resnet-lamb"
    # the same table row but for what W&B does not hold (expected) and the epoch count (no max_epochs)
    (ours,), (theirs,) = (other_sections([r])[5:] for r in (tiny, local))
    cells = lambda line: [c.strip() for c in line.split("|")][3:10]  # noqa: E731 - schedule..best top-5
    assert cells(ours)[:3] + cells(ours)[4:] == cells(theirs)[:3] + cells(theirs)[4:]
    assert cells(ours)[3] == "2/?" and cells(theirs)[3] == "2/2"
    assert live.status == "in progress" and "W&B state running" in live.reason and len(live.val) == 1
    assert alien.status == "incomplete" and "no optimizer" in alien.reason


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("key", [None, "x" * 40], ids=["no-key", "unreachable"])
def test_wandb_api_unreachable_is_one_line(runs, tmp_path, monkeypatch, capsys, key):
    import resnet_lamb.report.wandb_runs as report

    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no ~/.netrc key either
    (tmp_path / "netrc").write_text("")
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(report, "API_TIMEOUT_S", 2)
    import wandb

    timeouts, real_api = [], wandb.Api
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: timeouts.append(k.get("timeout")) or real_api(*a, **k))
    out = tmp_path / "out"
    rc = run_cli("report", str(runs / "tiny"), "--out", str(out), "--wandb", "me/resnet-lamb")
    assert set(timeouts) <= {2}, timeouts  # every W&B request bounded by API_TIMEOUT_S, not wandb's own default
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("resnet-lamb: error: --wandb me/resnet-lamb: "), err
    assert "`wandb login`" in err[0] and "WANDB_API_KEY" in err[0] and "drop --wandb" in err[0]
    assert ("no W&B API key configured" in err[0]) if key is None else ("did not answer" in err[0])
    assert not out.exists()


def test_wandb_project_must_be_entity_slash_project(tmp_path, capsys):
    assert run_cli("report", "--out", str(tmp_path / "out"), "--wandb", "resnet-lamb") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ENTITY/PROJECT" in err[0]
