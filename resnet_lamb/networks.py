"""The networks a run trains, built with random weights.

* ``arch``: any torchvision ResNet constructor (resnet18/34/50/101/152, wide_resnet*, resnext*),
  built with ``weights=None``.  ``small_input`` swaps the 7x7/2 stem + max-pool for a 3x3/1 conv
  and no pool (for 28-64 px proxies).  ``zero_init_residual`` zeroes each residual block's last
  BatchNorm gamma (Goyal et al. 2017).  ``bn_batch``: ghost BatchNorm, training statistics over
  groups of ``bn_batch`` samples of each micro batch (:mod:`resnet_lamb.ghost_batchnorm`; None:
  plain BatchNorm over the micro batch).
* ``mlp``: the TensorFlow LAMB README's MNIST MLP (784-512-512-10 at 28 px): the channel mean of
  the image, flattened, two ReLU hidden layers of ``mlp_hidden`` units; its ``input_size`` is the
  image size (the CLI copies data.image_size).
* ``small_resnet``: the CPU proxy study's tiny ResNet (:mod:`resnet_lamb.small_resnet`, BatchNorm).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from resnet_lamb.errors import RecipeError
from resnet_lamb.recipe import check_arch
from resnet_lamb.small_resnet import SmallResNet


class MLP(nn.Sequential):
    """Grayscale (channel mean) image, flattened -> ReLU hidden layers -> class logits."""

    def __init__(self, input_size: int, hidden: tuple[int, ...], num_classes: int):
        sizes = [input_size * input_size, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.Linear(sizes[-1], num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images.mean(dim=1))


def build_resnet(
    arch: str = "resnet50",
    num_classes: int = 1000,
    small_input: bool = False,
    zero_init_residual: bool = False,
    input_size: int | None = None,
    mlp_hidden: tuple[int, ...] = (512, 512),
    bn_batch: int | None = None,
) -> nn.Module:
    """A torchvision ResNet with random weights; ``small_input``: 3x3 stride-1 stem, no max-pool;
    ``bn_batch``: ghost BatchNorm over groups of that many samples (the same initial weights).
    ``arch="mlp"``: :class:`MLP` over ``input_size`` x ``input_size`` images (no BatchNorm)."""
    check_arch(arch)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise RecipeError(f"model.num_classes: must be a positive integer, got {num_classes!r}")
    if arch == "mlp":
        if not isinstance(input_size, int) or input_size < 1:
            raise RecipeError(
                "model.input_size: the mlp needs the image size; set data.image_size (the CLI "
                "copies it) or model.input_size"
            )
        return MLP(input_size, tuple(mlp_hidden), num_classes)
    kw = {}
    if bn_batch is not None:
        from functools import partial

        from resnet_lamb.ghost_batchnorm import GhostBatchNorm2d

        kw["norm_layer"] = partial(GhostBatchNorm2d, ghost_batch=bn_batch)
    if arch == "small_resnet":  # the CPU proxy study's tiny ResNet
        return SmallResNet(num_classes, zero_init_residual, kw.get("norm_layer"))
    net = getattr(torchvision.models, arch)(
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual, **kw
    )
    if small_input:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net
