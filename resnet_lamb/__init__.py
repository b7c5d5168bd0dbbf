"""resnet-lamb: a harness to reproduce the ImageNet/ResNet-50 results of the LAMB paper."""

__version__ = "0.1.0"
