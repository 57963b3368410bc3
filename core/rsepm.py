"""The RS+EPM network: a backbone, a CAM branch and a DeepLabv3+ segmentation head, and its losses.

One network, after Jo, Yu and Kim, "RecurSeed and EdgePredictMix: Single-stage Learning is
Sufficient for Weakly-Supervised Semantic Segmentation" (arXiv:2204.06754, 2022):

- backbone at output stride 16 (the last ResNet stage dilated instead of strided);
- CAM branch: a bias-free 1x1 convolution on the last feature map gives one activation map per
  class; the spatial mean of that map is the class logit, so classification and CAM come from
  one forward pass and no backward pass;
- segmentation head: ASPP on the stride-16 features and a decoder that mixes in the stride-4
  features (DeepLabv3+), with C + 1 outputs, background first.

The authors released inference code only. Everything about training here (the losses, when
each starts, what the segmentation head learns from) is built from the paper's text and marked
"our choice" where the paper leaves it open.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet50
from torchvision.models.resnet import BasicBlock, ResNet

from core.weights import load_pretrained

log = logging.getLogger(__name__)

# Backbones the command line offers. "resnet10" is the ResNet-18 layout with one block per stage:
# small enough to train from scratch on a 2-core CPU in tests and benchmarks.
ARCHS = ("resnet10", "resnet18", "resnet50", "mobilenet_v3")

# The torchvision builder name behind each arch, for core.weights.load_pretrained.
_TORCHVISION_NAMES = {
    "resnet10": "resnet10",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "mobilenet_v3": "mobilenet_v3_large",
    "mobilenet_v3_large": "mobilenet_v3_large",
}

# Images are normalised with ImageNet statistics so torchvision's pretrained weights fit.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IGNORE_INDEX = 255


class RSEPMOutput(NamedTuple):
    """What one forward pass gives, for images (N, 3, H, W).

    logits: (N, C) class logits, the spatial mean of `cams`.
    cams: (N, C, H/16, W/16) raw class activation maps (before ReLU).
    seg_logits: (N, C + 1, H/4, W/4) segmentation logits, background first; None when the
        segmentation head was skipped.
    features: [(N, D1, H/16, W/16), (N, D2, H/16, W/16)] the two deepest stages, for the
        self-correlation of RecurSeed; empty unless asked for.
    """

    logits: torch.Tensor
    cams: torch.Tensor
    seg_logits: torch.Tensor | None
    features: list[torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Backbones: each returns (low, mid, high) = stride-4, stride-16 and stride-16 feature maps.


class _ResNetFeatures(nn.Module):
    def __init__(self, resnet: ResNet):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.low_channels = _out_channels(resnet.layer1)
        self.mid_channels = _out_channels(resnet.layer3)
        self.high_channels = _out_channels(resnet.layer4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low = self.layer1(self.stem(x))
        mid = self.layer3(self.layer2(low))
        return low, mid, self.layer4(mid)


class _MobileNetFeatures(nn.Module):
    # Block indices of torchvision's MobileNetV3-Large: features[:4] end at stride 4 (24 ch),
    # features[4:13] at stride 16 (112 ch) and the rest, dilated, stay at stride 16 (960 ch).
    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.low = features[:4]
        self.mid = features[4:13]
        self.high = features[13:]
        self.low_channels, self.mid_channels, self.high_channels = 24, 112, 960

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low = self.low(x)
        mid = self.mid(low)
        return low, mid, self.high(mid)


def _out_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


def _dilate_last_basic_stage(resnet: ResNet) -> None:
    """Turn layer4's stride 2 into dilation 2 for BasicBlock ResNets (output stride 16).

    torchvision's replace_stride_with_dilation refuses BasicBlock, so the convolutions are
    changed in place: the same weights, sampled on a grid twice as wide.
    """
    for index, block in enumerate(resnet.layer4):
        if index == 0:
            block.conv1.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
        else:
            block.conv1.dilation, block.conv1.padding = (2, 2), (2, 2)
        block.conv2.dilation, block.conv2.padding = (2, 2), (2, 2)


def build_backbone(
    arch: str, weights: str | None = None, *, from_checkpoint: bool = False
) -> nn.Module:
    """A feature extractor giving (low, mid, high) at strides (4, 16, 16).

    Args:
        arch: one of ARCHS ("mobilenet_v3_large" is accepted for "mobilenet_v3").
        weights: None for random initialisation (logs a warning), "torchvision", or a .pth path;
            see core.weights.load_pretrained.
        from_checkpoint: the caller loads all weights next, so none are loaded here and no
            random-initialisation warning is logged.
    """
    if arch not in _TORCHVISION_NAMES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    name = _TORCHVISION_NAMES[arch]
    if arch == "resnet10":
        model = ResNet(BasicBlock, [1, 1, 1, 1])
    elif arch == "resnet18":
        model = resnet18()
    elif arch == "resnet50":
        model = resnet50(replace_stride_with_dilation=[False, False, True])
    else:
        model = mobilenet_v3_large(dilated=True)
    if not from_checkpoint:
        load_pretrained(model, name, weights)

    if arch in ("resnet10", "resnet18"):
        _dilate_last_basic_stage(model)
    if isinstance(model, ResNet):
        return _ResNetFeatures(model)
    return _MobileNetFeatures(model.features)


# ----------------------------------------------------------------------------------------------
# Segmentation head (DeepLabv3+).


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling at output stride 16: rates 6, 12, 18 and image pooling."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, cout, 1)] + [_conv_bn_relu(cin, cout, 3, r) for r in rates]
        )
        # No BatchNorm after the pooled branch: a (N, C, 1, 1) batch of one image has no
        # variance to normalise in training.
        self.pooled = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True)
        )
        self.project = _conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pooled(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, dim=1))


class Decoder(nn.Module):
    """DeepLabv3+ decoder: ASPP output upsampled to stride 4, joined with the low-level map."""

    def __init__(self, low_channels: int, aspp_channels: int, num_outputs: int, reduce: int = 48):
        super().__init__()
        self.reduce = _conv_bn_relu(low_channels, reduce, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(aspp_channels + reduce, aspp_channels),
            _conv_bn_relu(aspp_channels, aspp_channels),
        )
        self.classifier = nn.Conv2d(aspp_channels, num_outputs, 1)

    def forward(self, aspp: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        aspp = F.interpolate(aspp, size=low.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([aspp, self.reduce(low)], dim=1)))


# ----------------------------------------------------------------------------------------------
# The network.


class RSEPMNet(nn.Module):
    """Backbone + CAM branch + segmentation head. See the module docstring."""

    def __init__(self, backbone: nn.Module, num_classes: int, seg_channels: int = 256):
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        self.num_classes = num_classes
        self.backbone = backbone
        # Bias-free so that the CAM of a class is exactly the per-position logit: the classifier
        # and the map cannot disagree by a constant.
        self.classifier = nn.Conv2d(backbone.high_channels, num_classes, 1, bias=False)
        self.aspp = ASPP(backbone.high_channels, seg_channels)
        self.decoder = Decoder(backbone.low_channels, seg_channels, num_classes + 1)

    def forward(
        self, images: torch.Tensor, with_seg: bool = True, with_features: bool = False
    ) -> RSEPMOutput:
        """images: (N, 3, H, W) normalised with IMAGENET_MEAN/STD; H, W multiples of 16 are best."""
        low, mid, high = self.backbone(images)
        cams = self.classifier(high)  # (N, C, h, w)
        logits = cams.mean(dim=(2, 3))  # (N, C)
        seg_logits = self.decoder(self.aspp(high), low) if with_seg else None
        features = [mid, high] if with_features else []
        return RSEPMOutput(logits=logits, cams=cams, seg_logits=seg_logits, features=features)

    def head_parameters(self) -> list[nn.Parameter]:
        """The layers trained from scratch (CAM classifier, ASPP, decoder)."""
        return [
            *self.classifier.parameters(),
            *self.aspp.parameters(),
            *self.decoder.parameters(),
        ]


def build_rsepm(
    arch: str,
    num_classes: int,
    *,
    weights: str | None = None,
    seg_channels: int | None = None,
    from_checkpoint: bool = False,
) -> RSEPMNet:
    """Build the RS+EPM network.

    Args:
        arch: one of ARCHS.
        num_classes: C, the number of foreground classes (1 in binary mode).
        weights: backbone weights, see core.weights.load_pretrained (None = random, with a warning).
        seg_channels: width of ASPP and decoder; default 64 for the small backbones (CPU), 256
            for resnet50.
        from_checkpoint: skip backbone weights (a checkpoint's state dict is loaded next).
    """
    if seg_channels is None:
        seg_channels = 256 if arch == "resnet50" else 64
    backbone = build_backbone(arch, weights, from_checkpoint=from_checkpoint)
    return RSEPMNet(backbone, num_classes, seg_channels)


def load_rsepm(
    checkpoint: str | Path | dict, device: torch.device | str = "cpu"
) -> tuple[RSEPMNet, dict]:
    """Rebuild a trained network from a checkpoint written by core.train_classifier.

    Returns:
        (model in eval mode on `device`, checkpoint dict without the optimizer state). The dict
        holds at least "arch", "classes" and "config".
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in ("model", "arch", "classes"):
        if key not in checkpoint:
            raise ValueError(f"not an RS+EPM checkpoint: the {key!r} entry is missing")
    # The head's width is read off the weights, so a change of the default cannot break
    # loading an older checkpoint.
    seg_channels = checkpoint["model"]["aspp.project.0.weight"].shape[0]
    model = build_rsepm(
        checkpoint["arch"],
        len(checkpoint["classes"]),
        seg_channels=seg_channels,
        from_checkpoint=True,
    )
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    meta = {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer", "scheduler")}
    return model, meta


# ----------------------------------------------------------------------------------------------
# Losses.


def classification_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE over the known tags.

    logits, tags: (N, C); tags 1 present, 0 absent, -1 unknown (left out: a photo tagged only
    for fire says nothing about smoke). NaN tags propagate, so a broken label shows up as a
    non-finite loss instead of being skipped.
    """
    known = (tags >= 0) | tags.isnan()
    loss = F.binary_cross_entropy_with_logits(logits, tags.clamp(min=0), reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def segmentation_loss(seg_logits: torch.Tensor, pseudo_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a pseudo mask with an ignored band.

    seg_logits: (N, C + 1, h, w); pseudo_mask: (N, h, w) long, 0 background, 1..C classes,
    IGNORE_INDEX uncertain. Returns 0 (with a gradient path) when every pixel is ignored.
    """
    if (pseudo_mask != IGNORE_INDEX).sum() == 0:
        return seg_logits.sum() * 0.0
    return F.cross_entropy(seg_logits, pseudo_mask, ignore_index=IGNORE_INDEX)


def cam_pixel_loss(cams: torch.Tensor, pseudo_mask: torch.Tensor) -> torch.Tensor:
    """Pixel-level BCE of the CAM logits against a pseudo mask (RecurSeed's CAM term).

    The paper trains the CAM branch on seeds derived from the segmentation head so both branches
    improve each other; the exact loss is not given. Our choice: each CAM position is a logit of
    "this class is here", the target is the pseudo mask resized to the CAM grid (nearest), and
    ignored positions are left out.

    cams: (N, C, h, w) raw; pseudo_mask: (N, H, W) long as in segmentation_loss.
    """
    mask = F.interpolate(pseudo_mask[:, None].float(), size=cams.shape[2:], mode="nearest")[:, 0]
    mask = mask.long()
    valid = mask != IGNORE_INDEX  # (N, h, w)
    if valid.sum() == 0:
        return cams.sum() * 0.0
    classes = torch.arange(1, cams.shape[1] + 1, device=cams.device).view(1, -1, 1, 1)
    target = (mask[:, None] == classes).float()  # (N, C, h, w)
    loss = F.binary_cross_entropy_with_logits(cams, target, reduction="none")
    weight = valid[:, None].expand_as(loss).float()
    return (loss * weight).sum() / weight.sum()
