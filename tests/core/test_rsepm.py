import pytest
import torch
import torch.nn.functional as F

from core.rsepm import (
    IGNORE_INDEX,
    build_rsepm,
    cam_pixel_loss,
    classification_loss,
    load_rsepm,
    segmentation_loss,
)

SEEDS = (0, 1, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_rsepm("resnet10", 2, seg_channels=16).eval()


def test_output_shapes_follow_stride_16_and_4(tiny_model):
    out = tiny_model(torch.randn(2, 3, 64, 96), with_features=True)
    assert out.logits.shape == (2, 2)
    assert out.cams.shape == (2, 2, 4, 6)
    assert out.seg_logits.shape == (2, 3, 16, 24)
    assert [f.shape[2:] for f in out.features] == [(4, 6), (4, 6)]
    assert tiny_model(torch.randn(1, 3, 64, 64), with_seg=False).seg_logits is None


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3"])
def test_other_backbones_keep_output_stride_16(arch):
    model = build_rsepm(arch, 1, seg_channels=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.cams.shape == (1, 1, 4, 4)
    assert out.seg_logits.shape == (1, 2, 16, 16)


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown arch"):
        build_rsepm("vgg16", 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_cam_is_the_bias_free_classifier_at_every_position(tiny_model, seed):
    torch.manual_seed(seed)
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        _, _, high = tiny_model.backbone(images)
        out = tiny_model(images, with_seg=False)
    weight = tiny_model.classifier.weight[:, :, 0, 0]  # (C, D)
    n, _, h, w = high.shape
    reference = torch.zeros(n, weight.shape[0], h, w)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for c in range(weight.shape[0]):
                    reference[b, c, i, j] = (high[b, :, i, j] * weight[c]).sum()
    torch.testing.assert_close(out.cams, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits, reference.mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


def test_classification_loss_is_multilabel_bce():
    logits = torch.tensor([[2.0, -1.0]])
    tags = torch.tensor([[1.0, 0.0]])
    expected = (
        -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(torch.sigmoid(torch.tensor(1.0))))
        / 2
    )
    torch.testing.assert_close(classification_loss(logits, tags), expected)


def test_classification_loss_leaves_unknown_tags_out():
    logits = torch.tensor([[2.0, -1.0, 5.0]])
    with_unknown = classification_loss(logits, torch.tensor([[1.0, 0.0, -1.0]]))
    known_only = classification_loss(logits[:, :2], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(with_unknown, known_only)
    assert torch.isnan(classification_loss(logits, torch.tensor([[float("nan"), 0.0, 1.0]])))


def test_segmentation_loss_ignores_the_uncertain_band():
    logits = torch.randn(1, 3, 4, 4)
    mask = torch.full((1, 4, 4), IGNORE_INDEX)
    assert segmentation_loss(logits, mask).item() == 0.0
    mask[0, 0, 0] = 2
    expected = -torch.log_softmax(logits[0, :, 0, 0], dim=0)[2]
    torch.testing.assert_close(segmentation_loss(logits, mask), expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_cam_pixel_loss_matches_a_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    cams = torch.randn(2, 2, 3, 3, generator=gen)
    mask = torch.randint(0, 3, (2, 3, 3), generator=gen)
    mask[0, 1, 1] = IGNORE_INDEX
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                if mask[b, i, j] == IGNORE_INDEX:
                    continue
                for c in range(2):
                    target = float(mask[b, i, j] == c + 1)
                    p = torch.sigmoid(cams[b, c, i, j])
                    total += -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
                    count += 1
    torch.testing.assert_close(cam_pixel_loss(cams, mask), total / count)


def test_cam_pixel_loss_resizes_the_mask_to_the_cam_grid():
    cams = torch.zeros(1, 1, 2, 2, requires_grad=True)
    mask = torch.ones(1, 8, 8, dtype=torch.long)
    loss = cam_pixel_loss(cams, mask)
    torch.testing.assert_close(loss, F.softplus(torch.tensor(0.0)) * 1.0)
    loss.backward()
    assert cams.grad is not None


def test_checkpoint_round_trip(tiny_model, tmp_path):
    path = tmp_path / "model.pt"
    config = {"seg_channels": 16}
    torch.save(
        {
            "model": tiny_model.state_dict(),
            "arch": "resnet10",
            "classes": ["fire", "smoke"],
            "config": config,
        },
        path,
    )
    loaded, meta = load_rsepm(path)
    assert meta["classes"] == ["fire", "smoke"]
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).seg_logits, tiny_model(images).seg_logits)


def test_load_refuses_a_foreign_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="'arch' entry is missing"):
        load_rsepm({"model": {}, "classes": []})
