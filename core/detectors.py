"""Dense-head detectors (torchvision FCOS) in four sizes, and the per-level tensors distillation
reads.

Every variant is an FCOS detector on an FPN over the backbone's stride-8, 16 and 32 stages plus
two extra levels (P6, P7), so the pyramid strides are (8, 16, 32, 64, 128) for all of them. That
is what lets a student be distilled from a teacher level by level: level l of the student sees
the same grid as level l of the teacher, only its channel count may differ.

| variant        | backbone                                | FPN ch. | head convs | default size |
|----------------|-----------------------------------------|---------|------------|--------------|
| `server`       | ResNet-50                               | 256     | 4          | 640          |
| `edge`         | ResNet-18                               | 128     | 4          | 512          |
| `tiny-teacher` | ResNet-10 layout, widths 32-64-128-256  | 64      | 2          | 256          |
| `tiny-student` | ResNet-10 layout, widths 8-16-32-64     | 32      | 1          | 256          |

The tiny variants have no pretrained weights and exist so tests and `bench/distill.py` can train
on a 2-core CPU in minutes.

Normalisation: a backbone loaded from pretrained weights keeps its BatchNorm statistics frozen
(FrozenBatchNorm2d, as torchvision's detection models do, since detection batches are too small
to estimate them); a backbone trained from scratch uses GroupNorm instead, because frozen
identity statistics would leave it with no normalisation at all, and because GroupNorm does not
depend on the batch, which keeps DistributedDataParallel training identical to one process.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import (
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from core.weights import load_pretrained

log = logging.getLogger(__name__)

PYRAMID_STRIDES = (8, 16, 32, 64, 128)
LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")


@dataclass(frozen=True)
class DetectorSpec:
    """How one variant is built. `arch` names a torchvision ResNet, or "small" for our own."""

    arch: str
    fpn_channels: int
    head_convs: int
    image_size: int
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    blocks: tuple[int, int, int, int] = (1, 1, 1, 1)


VARIANTS: dict[str, DetectorSpec] = {
    "server": DetectorSpec("resnet50", 256, 4, 640, widths=(256, 512, 1024, 2048)),
    "edge": DetectorSpec("resnet18", 128, 4, 512),
    "tiny-teacher": DetectorSpec("small", 64, 2, 256, widths=(32, 64, 128, 256)),
    "tiny-student": DetectorSpec("small", 32, 1, 256, widths=(8, 16, 32, 64)),
}

# Roles: the pair a retrain job distils, at full size and at test size.
TEACHER_FOR = {"edge": "server", "tiny-student": "tiny-teacher"}


def _group_norm(num_channels: int) -> nn.GroupNorm:
    # 8 channels per group down to narrow layers, which then get at least 2 groups.
    return nn.GroupNorm(max(1, min(32, num_channels // 8)), num_channels)


class SmallResNet(nn.Module):
    """A ResNet-18-style backbone with chosen widths and blocks per stage (BasicBlock, GroupNorm).

    Attribute names (conv1, layer1..layer4) follow torchvision's ResNet so the FPN wrapper picks
    the stages the same way. Input (N, 3, H, W); layer2/3/4 have strides 8/16/32.
    """

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...]) -> None:
        super().__init__()
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _group_norm(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(count):
                downsample = None
                block_stride = stride if block == 0 else 1
                if block_stride != 1 or in_channels != width:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, width, 1, stride=block_stride, bias=False),
                        _group_norm(width),
                    )
                layers.append(
                    BasicBlock(in_channels, width, block_stride, downsample, norm_layer=_group_norm)
                )
                in_channels = width
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet_body(arch: str, weights: str | None, *, quiet: bool = False) -> tuple[nn.Module, str]:
    """A torchvision ResNet and its normalisation: ("frozen_bn") pretrained when `weights`
    load, else ("group") randomly initialised with GroupNorm. load_pretrained warns about
    random initialisation unless `quiet` (a checkpoint is about to be loaded)."""
    builder = {"resnet18": resnet18, "resnet50": resnet50}[arch]
    if weights:
        body = builder(weights=None, norm_layer=FrozenBatchNorm2d)
        if load_pretrained(body, arch, weights) != "random":
            _freeze_stem(body)
            return body, "frozen_bn"
    elif not quiet:
        load_pretrained(nn.Module(), arch, None)  # only warns: random initialisation
    return builder(weights=None, norm_layer=_group_norm), "group"


def _freeze_stem(body: nn.Module) -> None:
    # Like torchvision's detectors: the stem and first stage stay as pretrained.
    for name, parameter in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            parameter.requires_grad_(False)


def build_detector(
    variant: str,
    num_classes: int,
    *,
    weights: str | None = None,
    image_size: int | None = None,
) -> FCOS:
    """Build an FCOS detector.

    Args:
        variant: one of VARIANTS: "server", "edge", "tiny-teacher", "tiny-student".
        num_classes: object classes, without background (FCOS uses sigmoid scores per class).
        weights: backbone weights for "server"/"edge": "torchvision" (from the torch hub cache),
            a .pth path, or None for random initialisation (which warns). The tiny variants
            always start from random initialisation.
        image_size: the longer image side the model resizes inputs to; defaults per variant.

    Returns:
        A torchvision FCOS with attributes `variant` and `backbone_norm` ("frozen_bn" or
        "group"). In training mode `model(images, targets)` takes a list of (3, H, W) float
        images in [0, 1] and targets {"boxes": (N, 4) x1y1x2y2 pixels, "labels": (N,) int64 in
        [0, num_classes)} and returns the loss dict (classification, bbox_regression,
        bbox_ctrness); in eval mode it returns per image {"boxes", "labels", "scores"} in
        pixels of the image as given. Use `detector_forward` to also get the per-level
        features and classification logits.
    """
    spec = _spec(variant, num_classes)
    if spec.arch == "small":
        if weights:
            log.warning("%s has no pretrained weights; ignoring weights=%r", variant, weights)
        body, norm = SmallResNet(spec.widths, spec.blocks), "group"
    else:
        body, norm = _resnet_body(spec.arch, weights)
    return _assemble(variant, body, norm, num_classes, image_size)


def build_detector_for_checkpoint(
    variant: str, num_classes: int, *, image_size: int, backbone_norm: str
) -> FCOS:
    """The same architecture a checkpoint was trained with, left for its weights to fill."""
    spec = _spec(variant, num_classes)
    if spec.arch == "small":
        body = SmallResNet(spec.widths, spec.blocks)
    elif backbone_norm == "frozen_bn":
        body = {"resnet18": resnet18, "resnet50": resnet50}[spec.arch](
            weights=None, norm_layer=FrozenBatchNorm2d
        )
        _freeze_stem(body)
    else:
        body, _ = _resnet_body(spec.arch, None, quiet=True)
    return _assemble(variant, body, backbone_norm, num_classes, image_size)


def _spec(variant: str, num_classes: int) -> DetectorSpec:
    if variant not in VARIANTS:
        raise ValueError(f"unknown detector variant {variant!r}; choose one of {list(VARIANTS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return VARIANTS[variant]


def _assemble(
    variant: str, body: nn.Module, norm: str, num_classes: int, image_size: int | None
) -> FCOS:
    spec = VARIANTS[variant]
    size = image_size or spec.image_size
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=list(spec.widths[1:]),
        out_channels=spec.fpn_channels,
        extra_blocks=LastLevelP6P7(spec.fpn_channels, spec.fpn_channels),
    )
    head = FCOSHead(spec.fpn_channels, 1, num_classes, num_convs=0)
    # torchvision's GroupNorm(32) needs channels divisible by 32, and refuses a 1x1 P7 map
    # (images up to 128 px) when that leaves one channel per group; narrow heads use 2.
    groups = (
        32 if spec.fpn_channels >= 64 and spec.fpn_channels % 32 == 0 else spec.fpn_channels // 2
    )
    # Not `norm`: that is the backbone's, a string saved in checkpoints (load_detector reads them
    # with weights_only=True, which refuses a pickled partial).
    head_norm = partial(nn.GroupNorm, groups)
    head.classification_head = FCOSClassificationHead(
        spec.fpn_channels, 1, num_classes, spec.head_convs, norm_layer=head_norm
    )
    head.regression_head = FCOSRegressionHead(
        spec.fpn_channels, 1, spec.head_convs, norm_layer=head_norm
    )
    model = FCOS(
        backbone,
        num_classes,
        min_size=size,
        max_size=size,
        head=head,
        # COCO-style AP needs low-score detections too; the app filters by its own threshold.
        score_thresh=0.05,
        detections_per_img=100,
    )
    model.variant = variant
    model.backbone_norm = norm
    return model


def image_size_of(model: nn.Module) -> int:
    """The longer image side `model` resizes its inputs to."""
    module = model.module if hasattr(model, "module") else model
    return int(module.transform.max_size)


@dataclass
class DetectorPass:
    """What one forward pass through a detector yields for training and distillation.

    Attributes:
        losses: FCOS loss terms {"classification", "bbox_regression", "bbox_ctrness"}, scalar
            tensors; empty when no targets were given.
        features: per pyramid level (P3..P7) the FPN output, (N, C_fpn, H_l, W_l).
        cls_logits: per level the classification head's raw logits, (N, K, H_l, W_l).
        batch: the normalised, padded batch the backbone saw, (N, 3, H, W); pass it to
            `teacher_outputs` so the teacher sees exactly the same pixels.
    """

    losses: dict[str, Tensor]
    features: list[Tensor]
    cls_logits: list[Tensor]
    batch: Tensor


def _split_levels(flat: Tensor, features: list[Tensor]) -> list[Tensor]:
    """(N, sum_l H_l*W_l, K) head output -> per level (N, K, H_l, W_l)."""
    sizes = [f.shape[-2] * f.shape[-1] for f in features]
    levels = []
    for part, feature in zip(flat.split(sizes, dim=1), features, strict=True):
        n, _, h, w = feature.shape
        levels.append(part.reshape(n, h, w, -1).permute(0, 3, 1, 2))
    return levels


def detector_forward(
    model: FCOS, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
) -> DetectorPass:
    """Run the detector's pieces ourselves so the FPN features and logits come out too.

    Args:
        model: an FCOS from `build_detector` (may be wrapped in DistributedDataParallel; pass
            the wrapped module's `.module` only when you do not need gradient sync).
        images: list of (3, H, W) float images in [0, 1].
        targets: per image {"boxes": (M, 4) float x1y1x2y2 pixels, "labels": (M,) int64};
            M may be 0 (a hard negative). When given, the loss terms are computed.

    Returns:
        DetectorPass; see its docstring for shapes. Mirrors FCOS.forward's training branch.
    """
    module = model.module if hasattr(model, "module") else model
    image_list, targets = module.transform(images, targets)
    features = list(module.backbone(image_list.tensors).values())
    head_outputs = module.head(features)
    losses: dict[str, Tensor] = {}
    if targets is not None:
        anchors = module.anchor_generator(image_list, features)
        per_level = [f.shape[-2] * f.shape[-1] for f in features]
        losses = module.compute_loss(targets, head_outputs, anchors, per_level)
    return DetectorPass(
        losses=losses,
        features=features,
        cls_logits=_split_levels(head_outputs["cls_logits"], features),
        batch=image_list.tensors,
    )


@torch.no_grad()
def teacher_outputs(teacher: FCOS, batch: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The teacher's per-level FPN features (N, C_t, H_l, W_l) and classification logits
    (N, K, H_l, W_l) on a batch already normalised and padded by the student's transform
    (`DetectorPass.batch`, (N, 3, H, W)). Both models share ImageNet normalisation, so skipping
    the teacher's own transform keeps the two pyramids on the same grid."""
    features = list(teacher.backbone(batch).values())
    logits = teacher.head.classification_head(features)
    return features, _split_levels(logits, features)


def fpn_channels(model: nn.Module) -> int:
    """Channels of every FPN level of `model` (or of a DDP-wrapped one)."""
    module = model.module if hasattr(model, "module") else model
    return module.backbone.out_channels


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def detector_state(model: nn.Module) -> OrderedDict[str, Tensor]:
    """State dict of a plain or DDP-wrapped model, without the `module.` prefix."""
    module = model.module if hasattr(model, "module") else model
    return module.state_dict()


__all__ = [
    "LEVEL_NAMES",
    "PYRAMID_STRIDES",
    "TEACHER_FOR",
    "VARIANTS",
    "DetectorPass",
    "DetectorSpec",
    "SmallResNet",
    "build_detector",
    "build_detector_for_checkpoint",
    "count_parameters",
    "detector_forward",
    "detector_state",
    "fpn_channels",
    "image_size_of",
    "teacher_outputs",
]
