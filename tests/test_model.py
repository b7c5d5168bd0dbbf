"""LambModule / networks.build_resnet: stems, zero-init, loss and metrics with padding labels, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from resnet_lamb.errors import RecipeError
from resnet_lamb.model import LambModule
from resnet_lamb.networks import build_resnet


def test_small_input_stem_keeps_resolution():
    net = build_resnet("resnet18", 10, small_input=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    feats = {}
    net.layer1.register_forward_hook(lambda m, i, o: feats.update(l1=o.shape) or None)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and feats["l1"][-1] == 32  # no downsampling before layer1


def test_imagenet_stem_and_resnet50_head():
    net = build_resnet("resnet50", 1000)
    assert net.conv1.kernel_size == (7, 7) and isinstance(net.maxpool, nn.MaxPool2d)
    assert net.fc.in_features == 2048 and net.fc.out_features == 1000


def test_zero_init_residual_zeroes_last_bn_gamma():
    net = build_resnet("resnet50", 10, zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for layer in (net.layer1, net.layer4) for b in layer)
    net = build_resnet("resnet18", 10, zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in net.layer2)
    assert torch.count_nonzero(build_resnet("resnet18", 10).layer2[0].bn2.weight) > 0


def test_bad_model_args_name_the_key():
    with pytest.raises(RecipeError, match="model.arch"):
        build_resnet("resnet7", 10)
    with pytest.raises(RecipeError, match="model.label_smoothing"):
        LambModule(arch="resnet18", num_classes=10, label_smoothing=1.5)
    with pytest.raises(RecipeError, match="model.grad_clip_norm"):
        LambModule(arch="resnet18", num_classes=10, grad_clip_norm=-1.0)


def test_loss_ignores_padding_and_all_padding_is_zero():
    m = LambModule(arch="resnet18", num_classes=10, small_input=True, label_smoothing=0.1)
    logits = torch.randn(4, 10)
    labels = torch.tensor([1, 2, -1, -1])
    got = m._loss_sum(logits, labels)
    want = nn.functional.cross_entropy(logits[:2], labels[:2], reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    assert m._loss_sum(logits, torch.full((4,), -1)).item() == 0.0


def test_validation_metrics_ignore_padding():
    m = LambModule(arch="resnet18", num_classes=10, small_input=True)
    logits = torch.full((4, 10), -5.0)
    logits[0, 3] = 5.0  # right
    logits[1, 4] = 5.0  # wrong (label 2), 2 is second best -> in top-5
    logits[1, 2] = 4.0
    logits[2, 7] = 5.0  # padding: would be wrong
    labels = torch.tensor([3, 2, -1, -1])
    m.val_top1.update(logits, labels)
    m.val_top5.update(logits, labels)
    assert m.val_top1.compute().item() == pytest.approx(0.5)
    assert m.val_top5.compute().item() == pytest.approx(1.0)


def test_resume_identity_has_the_epoch_mode_and_reads_older_checkpoints():
    """Another epoch mode changes the run's steps and data stream: a resume must name it; a
    checkpoint written before the key existed counts as the default (padded, end_lr 0)."""
    from resnet_lamb.checkpoints import recipe_changes, recipe_identity
    from resnet_lamb.recipe import OptimizerSpec, ScheduleSpec

    padded = recipe_identity(OptimizerSpec(), ScheduleSpec(), 512, 90)
    full = recipe_identity(OptimizerSpec(), ScheduleSpec(), 512, 90, "full_batch")
    assert recipe_changes(padded, full) == ["data.epoch_mode"]
    older = {k: v for k, v in padded.items() if k not in ("data.epoch_mode", "model.schedule.end_lr")}
    assert recipe_changes(older, padded) == [] and recipe_changes(older, full) == ["data.epoch_mode"]
