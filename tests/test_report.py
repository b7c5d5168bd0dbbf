"""`resnet-lamb report`: one real 2-epoch run per module, copied with edited configs (LAMB at 512,
Adam+ and momentum at 16K, a run still in progress) and damaged logs (a CSV cut mid-line, a
missing val/top5 column); the report puts each in its table with the paper's numbers read from
paper_tables.yaml, writes valid PNGs and never crashes on a bad folder."""
from __future__ import annotations

import csv
import importlib.resources
import shutil

import pytest
import yaml

from conftest import run_cli, tiny_recipe, write_recipe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _paper() -> dict:
    text = importlib.resources.files("resnet_lamb.reference").joinpath("paper_tables.yaml").read_text()
    return yaml.safe_load(text)["imagenet_resnet50"]


def _copy_run(src, dst, **edits):
    """Copy a run folder (no checkpoints) and set dotted keys of its config.yaml."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for key, value in edits.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/{tiny (real), lamb-bs512, adam-goyal-16k, sgd-16k, running, truncated, no-top5}."""
    tmp = tmp_path_factory.mktemp("report")
    recipe = tiny_recipe(None, expected={"top1": 0.5, "source": "test expectation"})
    path = write_recipe(tmp / "tiny.yaml", recipe)
    rc = run_cli("fit", "--config", str(path), "--run.root", str(tmp / "runs"), "--run.name", "tiny",
                 "--run.wandb", "false")
    assert rc == 0
    root, tiny = tmp / "runs", tmp / "runs" / "tiny"
    _copy_run(tiny, root / "lamb-bs512", **{"data.global_batch": 512, "model.optimizer.base_batch": 512,
                                            "model.optimizer.base_lr": 0.005, "model.schedule.warmup_epochs": 0.3125})
    goyal = {"model.schedule.name": "goyal", "model.schedule.warmup_epochs": 0.0,
             "model.schedule.warmup_scaling": "none", "data.global_batch": 16384, "model.optimizer.kwargs": {},
             "model.optimizer.base_batch": 16384}
    _copy_run(tiny, root / "adam-goyal-16k", **{**goyal, "model.optimizer.name": "adam",
                                                "model.optimizer.base_lr": 0.002})
    _copy_run(tiny, root / "sgd-16k", **{**goyal, "model.optimizer.name": "sgd", "model.optimizer.base_lr": 6.4,
                                         "model.optimizer.kwargs": {"momentum": 0.9}})
    _copy_run(tiny, root / "running", **{"trainer.max_epochs": 5, "trainer.max_steps": 15})
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
    # the real run: other runs, grouped by optimizer x batch, with its recipe's expected
    assert "### lamb, global batch 32" in text
    assert "0.5000" in rows["tiny"] and "test expectation" in rows["tiny"] and "| complete |" in rows["tiny"]
    assert "in progress (2 of 5 epochs validated)" in rows["running"]


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


def test_wandb_flag_says_csv_only(runs, tmp_path, capsys):
    assert run_cli("report", str(runs / "tiny"), "--out", str(tmp_path), "--wandb", "me/resnet-lamb") == 0
    err = capsys.readouterr().err
    assert "only local CSV logs are read" in err
    assert (tmp_path / "report.md").is_file()
