"""Recipe loading (base chains), validation, derived numbers, and the paper recipes' numbers."""

import math
import textwrap
from importlib import resources
from pathlib import Path

import pytest
import yaml

from resnet_lamb.errors import RecipeError
from resnet_lamb.recipe import (
    OptimizerSpec,
    Plan,
    ScheduleSpec,
    count_train_images,
    deep_merge,
    derive_plan,
    load_recipe,
    plan_recipe,
    to_lightning_config,
    validate_recipe,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "imagenet"
TABLE5_FILES = {512: "lamb-bs512", 1024: "lamb-bs1k", 2048: "lamb-bs2k", 4096: "lamb-bs4k",
                8192: "lamb-bs8k", 16384: "lamb-bs16k", 32768: "lamb-bs32k"}
PAPER = yaml.safe_load(resources.files("resnet_lamb.reference").joinpath("paper_tables.yaml").read_text())
IMAGENET = PAPER["imagenet_resnet50"]


def plan_of(path, **kw) -> Plan:
    return plan_recipe(validate_recipe(load_recipe(path), path), **kw)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """\
trainer: {max_epochs: 2}
model:
  optimizer: {name: lamb, base_lr: 0.01, base_batch: 64}
data: {global_batch: 64, micro_batch: 32, train_images: 1000}
"""


# ------------------------------------------------------------------ the paper's recipes
AUTHOR = yaml.safe_load(resources.files("resnet_lamb.reference").joinpath("author_resnet50_32k.yaml").read_text())


@pytest.mark.parametrize("family", ["table5", "table5-text"])
@pytest.mark.parametrize("row", IMAGENET["table5_lamb"], ids=lambda r: str(r["batch"]))
def test_table5_recipes_reproduce_the_paper_rules(row, family):
    """Both families: the paper's LR and warmup rules, its step counts and accuracies."""
    path = RECIPES / family / f"{TABLE5_FILES[row['batch']]}.yaml"
    recipe = validate_recipe(load_recipe(path), path)
    plan = plan_recipe(recipe)
    b = row["batch"]
    assert plan.global_batch == b and plan.epochs == IMAGENET["epochs"] == 90
    # the paper's formula exactly: 4 / (2^k * 100), k = log2(32768/B)/2
    assert plan.lr == pytest.approx(4 / (2 ** (math.log2(32768 / b) / 2) * 100), rel=1e-12)
    # the transcribed table, to its printed precision (7 decimals: 0.0141421 is 0.01414213... rounded)
    assert abs(plan.lr - row["lr"]) <= 5e-8
    assert plan.warmup_epochs == pytest.approx(row["warmup_epochs"], rel=1e-12)
    assert plan.total_steps == math.ceil(90 * 1281167 / b)
    assert plan.warmup_steps == round(row["warmup_epochs"] * 1281167 / b)
    assert plan.images_seen == plan.total_steps * b
    assert plan.accumulation * plan.micro_batch * plan.world_size == b
    assert recipe.expected["top1"] == row["top1"] and recipe.expected["top5"] == row["top5"]
    assert recipe.optimizer.name == "lamb" and recipe.schedule.power == 1.0 and recipe.optimizer.param_rule == "author"
    defaults = IMAGENET["lamb_defaults"]
    assert tuple(recipe.optimizer.kwargs["betas"]) == (defaults["beta1"], defaults["beta2"])
    assert recipe.optimizer.kwargs["eps"] == defaults["eps"]
    assert plan.epoch_mode == "full_batch" and plan.optimizer_steps == plan.total_steps  # the paper's count
    if family == "table5-text":  # the text's reading: BERT's decay from step 0, decay 0.01, bias correction
        assert recipe.schedule.name == "poly" and recipe.optimizer.weight_decay == defaults["weight_decay"]
        assert "bias_correction" not in recipe.optimizer.kwargs and recipe.bn_batch is None


@pytest.mark.parametrize("batch", sorted(TABLE5_FILES))
def test_table5_recipes_are_the_author_32k_run(batch):
    """recipes/imagenet/table5: every setting of the author's 32K run (resnet_lamb/reference/
    author_resnet50_32k.yaml, read from fastalgo/imagenet_resnet50_lamb) at every batch, and every
    setting names its source."""
    path = RECIPES / "table5" / f"{TABLE5_FILES[batch]}.yaml"
    cfg = load_recipe(path)
    recipe = validate_recipe(cfg, path)
    plan = plan_recipe(recipe)
    opt, sched, model = recipe.optimizer, recipe.schedule, cfg["model"]
    assert (sched.name, sched.power, sched.end_lr) == ("poly_after_warmup", 1.0, 0.0)
    assert opt.weight_decay == AUTHOR["weight_decay_lamb"] and opt.param_rule == "author"
    assert tuple(opt.kwargs["betas"]) == tuple(AUTHOR["lamb"]["betas"]) and opt.kwargs["eps"] == AUTHOR["lamb"]["eps"]
    assert opt.kwargs["bias_correction"] is AUTHOR["lamb"]["bias_correction"] is False
    assert model["label_smoothing"] == AUTHOR["label_smoothing"]
    assert model["grad_clip_norm"] == AUTHOR["grad_clip_global_norm"]
    assert model["zero_init_residual"] is AUTHOR["zero_init_last_bn_gamma"] is True
    assert plan.bn_images == model["bn_batch"] == AUTHOR["per_core_batch"] and plan.micro_batch % 128 == 0
    assert plan.epoch_mode == "full_batch" and plan.padding_per_epoch == 0
    assert plan.optimizer_steps == plan.total_steps == math.ceil(90 * AUTHOR["train_images"] / batch)
    if batch == AUTHOR["global_batch"]:  # the run itself
        assert (plan.lr, plan.total_steps, plan.warmup_steps) == (AUTHOR["lr"], AUTHOR["train_steps"],
                                                                  AUTHOR["warmup_steps"])
    # every setting of the recipe (but where the data live and how fast they load) names its source
    keys = {"trainer.max_epochs", "model.arch", "model.label_smoothing", "model.zero_init_residual",
            "model.grad_clip_norm", "model.bn_batch", "data.epoch_mode", "data.train_images", "data.global_batch",
            "data.micro_batch"} | {f"model.optimizer.{k}" for k in ("name", "base_lr", "weight_decay", "param_rule")} \
        | {f"model.optimizer.kwargs.{k}" for k in opt.kwargs} \
        | {f"model.schedule.{k}" for k in ("name", "warmup_epochs", "end_lr", "power")}
    assert keys <= set(recipe.sources), sorted(keys - set(recipe.sources))


def test_paper_step_counts():
    assert plan_of(RECIPES / "table5" / "lamb-bs16k.yaml").total_steps == 7038
    assert plan_of(RECIPES / "table5" / "lamb-bs32k.yaml").total_steps == 3519


TABLE3 = {"adagrad": "adagrad", "adagrad-goyal": "adagrad_goyal", "adam": "adam", "adam-goyal": "adam_goyal",
          "adamw": "adamw", "adamw-goyal": "adamw_goyal", "momentum": "momentum", "lamb": "lamb"}


@pytest.mark.parametrize("stem", sorted(TABLE3))
def test_table3_recipes(stem):
    key = TABLE3[stem]
    path = RECIPES / "table3" / f"{stem}.yaml"
    recipe = validate_recipe(load_recipe(path), path)
    plan = plan_recipe(recipe)
    best = IMAGENET["tuning_best_16k"][key]
    assert plan.global_batch == 16384 and plan.total_steps == 7038
    assert abs(plan.lr - best["lr"]) <= 5e-8 * max(1.0, best["lr"])  # the table prints 7 decimals
    assert recipe.expected["top1"] == IMAGENET["table3_16k"][key]
    if stem.endswith("-goyal") or stem == "momentum":
        assert plan.schedule == "goyal" and plan.warmup_epochs == 5.0 and plan.milestones == (30, 60, 80)
        assert plan.milestone_steps == tuple(round(e * 1281167 / 16384) for e in (30, 60, 80))
        assert recipe.schedule.gamma == 0.1
    if "weight_decay" in best:
        assert recipe.optimizer.weight_decay == best["weight_decay"]
        assert recipe.optimizer.kwargs["l2"] == best["l2"]
    if stem == "lamb":
        assert plan.warmup_epochs == best["warmup_epochs"]


def test_nesterov_recipes():
    ref = IMAGENET["nesterov_variants"]
    lamb32 = plan_of(RECIPES / "table5" / "lamb-bs32k.yaml")
    for name in ("nlamb", "nnlamb"):
        path = RECIPES / "nesterov" / f"{name}-bs32k.yaml"
        recipe = validate_recipe(load_recipe(path), path)
        plan = plan_recipe(recipe)
        assert recipe.optimizer.name == name and plan.global_batch == ref["batch"]
        assert tuple(recipe.optimizer.kwargs["betas"]) == (ref["beta1"], ref["beta2"])
        assert recipe.optimizer.kwargs["eps"] == ref["eps"]
        assert (plan.lr, plan.warmup_steps, plan.total_steps) == (lamb32.lr, lamb32.warmup_steps, lamb32.total_steps)


def test_lars_recipes_cover_table5_batches_and_quote_the_text():
    for b, stem in TABLE5_FILES.items():
        path = RECIPES / "lars" / f"{stem.replace('lamb', 'lars')}.yaml"
        recipe = validate_recipe(load_recipe(path), path)
        plan = plan_recipe(recipe)
        assert recipe.optimizer.name == "lars_classic" and plan.global_batch == b
    assert validate_recipe(load_recipe(RECIPES / "lars" / "lars-bs32k.yaml"), "x").expected["top1"] == 0.763
    assert validate_recipe(load_recipe(RECIPES / "lars" / "lars-bs2k.yaml"), "x").expected["top1"] == 0.766


def test_every_runnable_recipe_plans():
    files = sorted(p for p in RECIPES.rglob("*.yaml") if not p.name.startswith("base"))
    assert len(files) == 7 + 7 + 8 + 7 + 2 + 1 + 4  # table3, table5, table5-text, lars, nesterov, challengers, mlperf
    for path in files:
        plan = plan_of(path)
        # shampoo-bs32k: the MLPerf entry's 44; MLPerf: a cap, the run stops at its target
        epochs = {"challengers": 44, "mlperf": plan.epochs}.get(path.parent.name, 90)
        assert plan.total_steps == math.ceil(epochs * 1281167 / plan.global_batch), path
        assert plan.warmup_steps < plan.total_steps


def test_world_size_and_micro_batch_change_accumulation():
    path = RECIPES / "table5" / "lamb-bs32k.yaml"
    assert plan_of(path).accumulation == 128
    assert plan_of(path, world_size=8).accumulation == 16
    assert plan_of(path, world_size=8, micro_batch=128).accumulation == 32
    p = plan_of(path, world_size=64, micro_batch=512)
    assert p.accumulation == 1 and p.micro_batches_per_epoch_per_rank == p.steps_per_epoch == 40
    assert plan_of(path, world_size=8).lr == plan_of(path).lr  # the LR follows the global batch only


# -------------------------------------------------------------------- loading and merging
def test_base_chain_and_deep_merge(tmp_path):
    write(tmp_path, "a/grand.yaml", """\
        trainer: {max_epochs: 90}
        model:
          arch: resnet50
          optimizer: {name: lamb, base_lr: 0.005, base_batch: 512, kwargs: {betas: [0.9, 0.999], eps: 1.0e-6}}
          schedule: {name: poly, warmup_epochs: 0.3125}
        data: {global_batch: 512, micro_batch: 256, train_images: 1281167, workers: 8}
        """)
    write(tmp_path, "a/b/parent.yaml", """\
        base: ../grand.yaml
        model:
          optimizer: {kwargs: {eps: 1e-8}}
          schedule: {milestones: [10, 20]}
        data: {global_batch: 1024}
        """)
    child = write(tmp_path, "child.yaml", """\
        base: a/b/parent.yaml
        expected: {top1: 0.5}
        model: {optimizer: {base_lr: 0.01}}
        data: {workers: null}
        """)
    cfg = load_recipe(child)
    assert "base" not in cfg
    assert cfg["model"]["optimizer"] == {"name": "lamb", "base_lr": 0.01, "base_batch": 512,
                                         "kwargs": {"betas": [0.9, 0.999], "eps": 1e-8}}  # 1e-8 read as a float
    assert cfg["model"]["schedule"] == {"name": "poly", "warmup_epochs": 0.3125, "milestones": [10, 20]}
    assert cfg["model"]["arch"] == "resnet50"
    assert cfg["data"] == {"global_batch": 1024, "micro_batch": 256, "train_images": 1281167, "workers": None}
    assert to_lightning_config(cfg).keys() == {"trainer", "model", "data"}
    recipe = validate_recipe(cfg, child)
    assert recipe.global_batch == 1024 and recipe.expected == {"top1": 0.5}


def test_deep_merge_does_not_alias():
    base = {"a": {"b": [1, 2]}, "c": 1}
    out = deep_merge(base, {"a": {"d": 3}})
    out["a"]["b"].append(9)
    assert base == {"a": {"b": [1, 2]}, "c": 1} and out["a"]["d"] == 3


@pytest.mark.parametrize("files, target, match", [
    ({"x.yaml": "base: y.yaml\n", "y.yaml": "base: x.yaml\n"}, "x.yaml", r"y\.yaml: base: cycle .*x\.yaml"),
    ({"x.yaml": "base: x.yaml\n"}, "x.yaml", "cycle"),
    ({"x.yaml": "base: nope/missing.yaml\n"}, "x.yaml", r"x\.yaml: base: .*missing\.yaml not found"),
    ({"x.yaml": "model:\n  optimizer: {name: lamb\n"}, "x.yaml", r"x\.yaml:\d+:\d+: YAML syntax error"),
    ({"x.yaml": "a: 1\n b: 2\n"}, "x.yaml", r"x\.yaml:2:\d+: YAML syntax error"),
    ({"x.yaml": ""}, "x.yaml", r"x\.yaml: empty recipe"),
    ({"x.yaml": "# only a comment\n"}, "x.yaml", r"x\.yaml: empty recipe"),
    ({"x.yaml": "- 1\n- 2\n"}, "x.yaml", "expected a YAML mapping"),
    ({}, "absent.yaml", r"absent\.yaml: recipe file not found"),
])
def test_load_errors_name_the_file(tmp_path, files, target, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(tmp_path / target)
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------- validation
def edited(**changes):
    cfg = yaml.safe_load(MINIMAL)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        if value is KeyError:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return cfg


@pytest.mark.parametrize("cfg, match", [
    (edited(model__optimizer__name="lamm"), r"model\.optimizer\.name: unknown optimizer 'lamm' \(did you mean 'lamb'\?\); choose one of .*lars"),
    (edited(model__optimizer__base_lr=KeyError), r"model\.optimizer\.base_lr: missing"),
    (edited(model__optimizer__name=KeyError), r"model\.optimizer\.name: missing"),
    (edited(model__optimizer__base_lrr=0.1), r"model\.optimizer\.base_lrr: unknown key \(did you mean base_lr\?\); allowed: name, base_lr, base_batch, scaling, weight_decay, param_rule, kwargs"),
    (edited(model__optimizer__base_lr=float("nan")), r"model\.optimizer\.base_lr: expected a positive finite number, got nan"),
    (edited(model__optimizer__base_lr=-0.1), r"model\.optimizer\.base_lr: expected a positive finite number"),
    (edited(model__optimizer__base_lr="0.1"), r"model\.optimizer\.base_lr: expected a positive finite number, got '0.1'"),
    (edited(model__optimizer__base_batch=0), r"model\.optimizer\.base_batch: expected a positive integer, got 0"),
    (edited(model__optimizer__scaling="square"), r"model\.optimizer\.scaling: unknown LR scaling rule 'square'.*sqrt, linear, none"),
    (edited(model__optimizer__param_rule="bert"), r"model\.optimizer\.param_rule: unknown parameter rule"),
    (edited(model__optimizer__weight_decay=-1), r"model\.optimizer\.weight_decay: expected a finite number >= 0"),
    (edited(model__optimizer__kwargs={"lr": 1.0}), r"model\.optimizer\.kwargs\.lr: set by base_lr"),
    (edited(model__optimizer__kwargs={"bettas": [0.9, 0.99]}), r"model\.optimizer\.kwargs\.bettas: unknown option for optimizer 'lamb' \(did you mean betas\?\)"),
    (edited(model__optimizer__kwargs=[1]), r"model\.optimizer\.kwargs: expected a mapping"),
    (edited(model__optimizer="lamb"), r"model\.optimizer: expected a mapping"),
    (edited(model__schedule__name="cosine"), r"model\.schedule\.name: unknown schedule 'cosine'; choose one of poly, poly_after_warmup, goyal, constant"),
    (edited(model__schedule__end_lr=-1), r"model\.schedule\.end_lr: expected a finite number >= 0, got -1"),
    (edited(model__schedule__name="goyal", model__schedule__end_lr=1e-4), r"model\.schedule\.end_lr: 0\.0001 is used by the poly and poly_after_warmup schedules only, not by goyal"),
    (edited(data__epoch_mode="fullbatch"), r"data\.epoch_mode: unknown epoch mode 'fullbatch' \(did you mean 'full_batch'\?\); choose one of padded, full_batch$"),
    (edited(model__bn_batch=0), r"model\.bn_batch: expected a positive integer, got 0"),
    (edited(sources=["x"]), r"sources: expected a mapping of recipe keys to their sources"),
    (edited(sources={"model.optimizer.base_l": "Table 5"}), r"sources\.model\.optimizer\.base_l: names no key this recipe sets"),
    (edited(sources={"model.optimizer.base_lr": 1}), r"sources\.model\.optimizer\.base_lr: expected the source as text, got 1"),
    (edited(model__schedule__warmup_epochs=-1), r"model\.schedule\.warmup_epochs: expected a finite number >= 0, got -1"),
    (edited(model__schedule__warmup_scaling="sqrt"), r"model\.schedule\.warmup_scaling: unknown warmup scaling rule"),
    (edited(model__schedule__milestones=[30, 20, 80]), r"model\.schedule\.milestones: expected strictly increasing epochs, got \[30, 20, 80\]"),
    (edited(model__schedule__milestones=[30, "x"]), r"model\.schedule\.milestones\[1\]: expected a positive integer"),
    (edited(model__schedule__gamma=2.0), r"model\.schedule\.gamma: expected a decay factor in \(0, 1\]"),
    (edited(model__schedule__powr=2.0), r"model\.schedule\.powr: unknown key \(did you mean power\?\)"),
    (edited(data__global_batch="512x"), r"data\.global_batch: expected a positive integer, got '512x'"),
    (edited(data__global_batch=512.5), r"data\.global_batch: expected a positive integer, got 512.5"),
    (edited(data__global_batch=True), r"data\.global_batch: expected a positive integer, got True"),
    (edited(data__global_batch=KeyError), r"data\.global_batch: missing"),
    (edited(data__micro_batch=-8), r"data\.micro_batch: expected a positive integer, got -8"),
    (edited(data__train_images=0), r"data\.train_images: expected a positive integer, got 0"),
    (edited(trainer__max_epochs=KeyError), r"trainer\.max_epochs: missing"),
    (edited(trainer__max_epochs="90"), r"trainer\.max_epochs: expected a positive integer, got '90'"),
    (edited(expected={"top1": 1.5}), r"expected\.top1: expected a fraction in \[0, 1\], got 1.5"),
    (edited(expected={"top1": 76.96}), r"expected\.top1: expected a fraction in \[0, 1\], got 76.96 \(accuracies are fractions: write 0.7696\)"),
    (edited(expected={"top5": -0.1}), r"expected\.top5: expected a fraction"),
    (edited(expected={"top_1": 0.7}), r"expected\.top_1: unknown key \(did you mean top1\?\)"),
    (edited(optimizer={"class_path": "torch.optim.SGD"}), r"optimizer: not a recipe key; .* model\.optimizer"),
    (edited(datta={}), r"datta: unknown key \(did you mean data\?\); allowed: base, expected, sources, seed_everything, trainer, model, data, ckpt_path, weights_only, run$"),
    (edited(model=KeyError), r"model: missing section"),
    (edited(seed_everything="zero"), r"seed_everything: expected an integer"),
])
def test_validation_errors_name_the_key(cfg, match):
    with pytest.raises(RecipeError, match=r"^r\.yaml: " + match) as err:
        validate_recipe(cfg, "r.yaml")
    assert "\n" not in str(err.value)


def test_minimal_recipe_defaults():
    recipe = validate_recipe(yaml.safe_load(MINIMAL), "r.yaml")
    assert recipe.optimizer == OptimizerSpec(name="lamb", base_lr=0.01, base_batch=64)
    assert recipe.schedule == ScheduleSpec()
    assert (recipe.global_batch, recipe.micro_batch, recipe.epochs, recipe.train_images) == (64, 32, 2, 1000)


def test_specs_are_plain_dataclasses_with_contract_defaults():
    opt, sched = OptimizerSpec(), ScheduleSpec()
    assert (opt.name, opt.base_lr, opt.base_batch, opt.scaling, opt.weight_decay, opt.param_rule, opt.kwargs) == \
        ("lamb", 0.005, 512, "sqrt", 0.01, "author", {})
    assert (sched.name, sched.warmup_epochs, sched.warmup_scaling, sched.power, sched.end_lr, sched.milestones,
            sched.gamma) == ("poly", 0.0, "linear", 1.0, 0.0, [30, 60, 80], 0.1)
    assert OptimizerSpec(base_lr=1).base_lr == 1.0 and isinstance(OptimizerSpec(base_lr=1).base_lr, float)
    with pytest.raises(RecipeError, match=r"model\.optimizer\.name: unknown optimizer 'foo'; choose one of lamb"):
        OptimizerSpec(name="foo")


# ---------------------------------------------------------------------------- derive_plan
def derive(**kw):
    args = dict(global_batch=512, micro_batch=64, world_size=1, train_images=10000, epochs=10)
    args.update(kw)
    spec = args.pop("schedule", ScheduleSpec(warmup_epochs=0.3125))
    return derive_plan(OptimizerSpec(), spec, **args)


def test_derive_plan_numbers():
    p = derive(global_batch=1024, micro_batch=128, world_size=2)
    assert p.accumulation == 4 and p.lr == pytest.approx(0.005 * math.sqrt(2))
    assert p.warmup_epochs == pytest.approx(0.625) and p.warmup_steps == round(0.625 * 10000 / 1024)
    assert p.steps_per_epoch == 10 and p.total_steps == math.ceil(10 * 10000 / 1024) == 98
    assert p.optimizer_steps == 100 and p.micro_batches_per_epoch_per_rank == 40
    assert p.padding_per_epoch == 10 * 1024 - 10000 and p.images_seen == 98 * 1024
    g = derive(schedule=ScheduleSpec(name="goyal", warmup_epochs=1, warmup_scaling="none", milestones=[3, 6]))
    assert g.milestones == (3, 6) and g.milestone_steps == (round(3 * 10000 / 512), round(6 * 10000 / 512))
    assert derive().milestones == ()  # only goyal uses milestones
    assert g.to_dict()["milestone_steps"] == list(g.milestone_steps)
    assert (p.epoch_mode, p.bn_batch, p.bn_images, p.padded_steps, p.full_batch_steps) == ("padded", None, 128, 100, 98)


def test_derive_plan_full_batch_and_ghost_batchnorm():
    """full_batch: ceil(E*N/B) optimizer steps, no padding, Lightning epochs of ceil(N/B) steps (the
    last one shorter); padded: E*ceil(N/B). bn_images: model.bn_batch, else the micro batch."""
    f = derive(global_batch=1024, micro_batch=128, world_size=2, epoch_mode="full_batch", bn_batch=32)
    assert (f.total_steps, f.optimizer_steps, f.full_batch_steps, f.padded_steps) == (98, 98, 98, 100)
    assert (f.steps_per_epoch, f.run_epochs, f.padding_per_epoch, f.images_seen) == (10, 10, 0, 98 * 1024)
    assert (f.bn_batch, f.bn_images) == (32, 32)
    assert [f.schedule_step(s) for s in range(98)] == list(range(98))  # every step a full batch
    p = derive(global_batch=1024, micro_batch=128, world_size=2)
    assert p.schedule_step(10) == 9 and p.optimizer_steps == 100  # padded: epoch 1 starts at paper step 9
    assert derive(micro_batch=64, bn_batch=64).bn_images == 64 and derive(micro_batch=64, bn_batch=1).bn_images == 1
    # 32K: 3519 full steps in 88 Lightning epochs of 40 (the last 39)
    big = derive(global_batch=32768, micro_batch=256, train_images=1281167, epochs=90, epoch_mode="full_batch")
    assert (big.optimizer_steps, big.padded_steps, big.run_epochs) == (3519, 3600, 88)
    assert big.optimizer_steps - 87 * big.steps_per_epoch == 39


@pytest.mark.parametrize("kw, match", [
    (dict(micro_batch=96), r"^data\.global_batch: 512 is not divisible by data\.micro_batch 96 x world size 1 = 96; "
                           r"valid data\.micro_batch values for world size 1: .*64, 128, 256, 512$"),
    (dict(micro_batch=64, world_size=3), r"data\.global_batch: 512 is not divisible by data\.micro_batch 64 x world size 3.*"
                                         r"none: data\.global_batch 512 is not divisible by world size 3"),
    (dict(micro_batch=1024), r"^data\.micro_batch: 1024 is larger than data\.global_batch 512"),
    (dict(micro_batch=0), r"^data\.micro_batch: expected a positive integer, got 0"),
    (dict(world_size=0), r"^world size .*: expected a positive integer, got 0"),
    (dict(train_images=-5), r"^data\.train_images: expected a positive integer"),
    (dict(epochs=0), r"^trainer\.max_epochs: expected a positive integer"),
    (dict(global_batch=163840, micro_batch=256, epochs=90),
     r"^model\.schedule\.warmup_epochs: 0\.3125 epochs at model\.optimizer\.base_batch 512 scale linearly to 100 "
     r"epochs at data\.global_batch 163840, longer than training \(trainer\.max_epochs 90\)"),
    (dict(schedule=ScheduleSpec(warmup_epochs=11, warmup_scaling="none")),
     r"^model\.schedule\.warmup_epochs: 11 epochs, longer than training \(trainer\.max_epochs 10\)"),
    (dict(schedule=ScheduleSpec(end_lr=0.01)),
     r"^model\.schedule\.end_lr: 0\.01 is above the peak LR 0\.005 \(model\.optimizer\.base_lr 0\.005 x \(512/512\)\^1/2\); "
     r"set model\.schedule\.end_lr to at most 0\.005$"),
    (dict(bn_batch=24), r"^model\.bn_batch: 24 does not divide data\.micro_batch 64 \(ghost BatchNorm .*\); set model\.bn_batch "
                        r"to one of 1, 2, 4, 8, 16, 32, 64 or data\.micro_batch to a multiple of 24$"),
    (dict(epoch_mode="fullbatch"), r"^data\.epoch_mode: unknown epoch mode 'fullbatch' \(did you mean 'full_batch'\?\)"),
])
def test_derive_plan_errors(kw, match):
    with pytest.raises(RecipeError, match=match):
        derive(**kw)


# --------------------------------------------------------------------------- train_images
def test_train_images_counted_from_root(tmp_path):
    for wnid, n in (("n01", 3), ("n02", 2)):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "train" / wnid / f"{i}.JPEG").write_bytes(b"")
    (tmp_path / "train" / "n01" / ".DS_Store").write_bytes(b"")  # skipped, as the data module skips it
    assert count_train_images(tmp_path) == 5
    cfg = edited(data__train_images=None, data__root=str(tmp_path))
    plan = plan_recipe(validate_recipe(cfg, "r.yaml"))
    assert plan.train_images == 5 and plan.steps_per_epoch == 1
    assert plan_recipe(validate_recipe(cfg, "r.yaml"), train_images=640).train_images == 640
    missing = edited(data__train_images=None, data__root=str(tmp_path / "nothing"))
    with pytest.raises(RecipeError, match=r"r\.yaml: data\.train_images: null and .*nothing/train does not exist; "
                                          r"set data\.train_images in the recipe or pass --train-images"):
        plan_recipe(validate_recipe(missing, "r.yaml"))
    with pytest.raises(RecipeError, match=r"data\.micro_batch: missing"):
        plan_recipe(validate_recipe(edited(data__micro_batch=None), "r.yaml"))


def test_optimizer_names_are_the_registry_s():
    """The one list of names (checked without torch) is exactly what the registry builds."""
    from resnet_lamb.optim.names import OPTIMIZER_NAMES
    from resnet_lamb.optim.registry import _REGISTRY, list_optimizers

    assert list(OPTIMIZER_NAMES) == list_optimizers() == list(_REGISTRY)


def test_demo_author_recipe_plans():
    """recipes/demo-author.yaml (README "Reproducing Table 5"): the demo through the author's
    schedule, full-batch epochs and ghost BatchNorm."""
    path = REPO / "recipes" / "demo-author.yaml"
    recipe = validate_recipe(load_recipe(path), path)
    plan = plan_recipe(recipe, train_images=6000)
    assert (plan.schedule, plan.epoch_mode, plan.bn_images, plan.micro_batch) == ("poly_after_warmup", "full_batch", 32, 128)
    assert plan.optimizer_steps == math.ceil(4 * 6000 / 128) and recipe.optimizer.kwargs["bias_correction"] is False
    assert recipe.sources and recipe.expected["top1"] > 0
