import logging

import pytest
import torch
from torch.testing import assert_close

from core.detectors import (
    LEVEL_NAMES,
    PYRAMID_STRIDES,
    VARIANTS,
    build_detector,
    build_detector_for_checkpoint,
    detector_forward,
    image_size_of,
    teacher_outputs,
)


def _targets():
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


@pytest.mark.parametrize("variant", ["tiny-teacher", "tiny-student"])
def test_forward_matches_torchvision_losses_and_shapes(variant):
    torch.manual_seed(0)
    model = build_detector(variant, num_classes=2, image_size=64).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    out = detector_forward(model, images, _targets())
    reference = model(images, _targets())
    assert sorted(out.losses) == ["bbox_ctrness", "bbox_regression", "classification"]
    for name, value in reference.items():
        assert_close(out.losses[name], value)
        assert torch.isfinite(value)

    channels = VARIANTS[variant].fpn_channels
    assert len(out.features) == len(out.cls_logits) == len(LEVEL_NAMES)
    for stride, feature, logits in zip(PYRAMID_STRIDES, out.features, out.cls_logits, strict=True):
        side = -(-64 // stride)
        assert feature.shape == (2, channels, side, side)
        assert logits.shape == (2, 2, side, side)
    assert out.batch.shape == (2, 3, 64, 64)


def test_per_level_logits_are_the_head_output_rearranged():
    torch.manual_seed(1)
    model = build_detector("tiny-student", num_classes=3, image_size=64).eval()
    out = detector_forward(model, [torch.rand(3, 64, 64)])
    flat = model.head.classification_head(out.features)  # (1, sum H*W, K)
    offset = 0
    for level in out.cls_logits:
        _, k, h, w = level.shape
        for y in range(h):
            for x in range(w):
                assert_close(level[0, :, y, x], flat[0, offset + y * w + x])
        offset += h * w
    assert offset == flat.shape[1]


def test_teacher_sees_the_same_grid_as_the_student():
    torch.manual_seed(2)
    student = build_detector("tiny-student", 2, image_size=96).train()
    teacher = build_detector("tiny-teacher", 2, image_size=96).eval()
    out = detector_forward(student, [torch.rand(3, 96, 80)], _targets()[:1])
    features, logits = teacher_outputs(teacher, out.batch)
    for s, t in zip(out.features, features, strict=True):
        assert s.shape[-2:] == t.shape[-2:]
        assert t.shape[1] == VARIANTS["tiny-teacher"].fpn_channels
    for s, t in zip(out.cls_logits, logits, strict=True):
        assert s.shape == t.shape
        assert not t.requires_grad


@pytest.mark.parametrize("variant", ["server", "edge"])
def test_full_size_variants_share_the_teacher_pyramid(variant):
    model = build_detector(variant, 2, image_size=64).eval()
    with torch.no_grad():
        features = list(model.backbone(torch.zeros(1, 3, 64, 64)).values())
    assert [f.shape[-1] for f in features] == [-(-64 // s) for s in PYRAMID_STRIDES]
    assert features[0].shape[1] == VARIANTS[variant].fpn_channels
    assert image_size_of(model) == 64


def test_backbone_weights_from_a_file_are_loaded_and_stem_frozen(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    source = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_detector("edge", 2, weights=str(path))
    body = model.backbone.body
    assert model.backbone_norm == "frozen_bn"
    assert_close(body.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert_close(body.bn1.running_var, source.bn1.running_var)
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad

    rebuilt = build_detector_for_checkpoint("edge", 2, image_size=512, backbone_norm="frozen_bn")
    rebuilt.load_state_dict(model.state_dict())  # same architecture, strict keys


def test_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING):
        model = build_detector("edge", 2)
    assert "random initialisation" in caplog.text
    assert model.backbone_norm == "group"


def test_unknown_variant_and_bad_classes():
    with pytest.raises(ValueError, match="tiny-student"):
        build_detector("huge", 2)
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("tiny-student", 0)


def test_narrow_head_runs_on_a_single_small_image():
    # A 1x1 P7 map with one image per batch: torchvision's GroupNorm(32) would refuse it.
    model = build_detector("tiny-student", 2, image_size=64).eval()
    with torch.no_grad():
        detections = model([torch.rand(3, 64, 64)])
    assert detections[0]["boxes"].shape[1] == 4
