import math

import pytest
import torch
from torch.testing import assert_close

from core.distill import (
    CWDLoss,
    DetectorDistillLoss,
    DistillConfig,
    channel_wise_distillation,
    classifier_distillation,
    kd_loss,
)


def _cwd_reference(student, teacher, tau):
    """Shu et al.'s formula with explicit loops over images and channels, in float64."""
    n, c = student.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            s = student[i, j].double().flatten() / tau
            t = teacher[i, j].double().flatten() / tau
            p_t = torch.exp(t - t.max()) / torch.exp(t - t.max()).sum()
            log_p_t = torch.log(p_t)
            log_p_s = s - s.max() - torch.log(torch.exp(s - s.max()).sum())
            total += float((p_t * (log_p_t - log_p_s)).sum())
    return torch.tensor(total * tau**2 / (n * c), dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_slow_reference(seed, tau):
    generator = torch.Generator().manual_seed(seed)
    shape = (2 + seed % 2, 3, 5, 4 + seed)
    student = torch.randn(shape, generator=generator) * 3
    teacher = torch.randn(shape, generator=generator) * 3
    loss = channel_wise_distillation(student, teacher, tau)
    assert_close(loss, _cwd_reference(student, teacher, tau), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cwd_is_zero_for_equal_maps_and_positive_otherwise(seed):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(2, 4, 6, 6, generator=generator) * 10
    assert_close(channel_wise_distillation(maps, maps.clone(), 2.0), torch.tensor(0.0))
    assert channel_wise_distillation(maps + torch.randn(maps.shape, generator=generator), maps) > 0


def test_cwd_ignores_a_per_channel_offset():
    # A softmax over positions does not change when the whole channel shifts.
    maps = torch.randn(2, 3, 4, 4)
    shifted = maps + torch.randn(2, 3, 1, 1) * 50
    assert_close(channel_wise_distillation(shifted, maps), torch.tensor(0.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cwd_gradient_finite_at_large_float16_activations(seed):
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (2, 3, 8, 8), generator=generator).float() * 2 - 1
    student = (signs * 100).half().requires_grad_()
    teacher = (-signs * 100 + torch.randn(signs.shape, generator=generator)).half()
    loss = channel_wise_distillation(student, teacher, tau=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    assert_close(loss, _cwd_reference(student.detach(), teacher, 1.0), rtol=1e-4, atol=1e-3)


def test_cwd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="CWDLoss"):
        channel_wise_distillation(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))


def _binary_kd_reference(student, teacher, tau):
    total, count = 0.0, 0
    for s, t in zip(student.flatten().tolist(), teacher.flatten().tolist(), strict=True):
        p = 1 / (1 + math.exp(-t / tau))
        q = 1 / (1 + math.exp(-s / tau))
        total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        count += 1
    return torch.tensor(total / count * tau**2, dtype=torch.float32)


def _softmax_kd_reference(student, teacher, tau):
    total = 0.0
    for s, t in zip(student.double(), teacher.double(), strict=True):
        p = torch.softmax(t / tau, 0)
        q = torch.softmax(s / tau, 0)
        total += float((p * (p / q).log()).sum())
    return torch.tensor(total / len(student) * tau**2, dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_kd_matches_references(seed, tau):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(6, 4, generator=generator) * 2
    teacher = torch.randn(6, 4, generator=generator) * 2
    assert_close(kd_loss(student, teacher, tau), _binary_kd_reference(student, teacher, tau))
    assert_close(
        kd_loss(student, teacher, tau, multi_label=False),
        _softmax_kd_reference(student, teacher, tau),
    )
    assert_close(kd_loss(student, student.clone(), tau), torch.tensor(0.0), atol=1e-7, rtol=0)


def test_kd_finite_at_large_logits():
    student = torch.tensor([[100.0, -100.0]], dtype=torch.float16, requires_grad=True)
    teacher = torch.tensor([[-100.0, 100.0]], dtype=torch.float16)
    loss = kd_loss(student, teacher, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 50
    assert torch.isfinite(student.grad).all()


def test_cwd_loss_adapts_channels_and_resizes():
    torch.manual_seed(0)
    module = CWDLoss(student_channels=8, teacher_channels=16, tau=2.0)
    student = torch.randn(2, 8, 4, 5, requires_grad=True)
    teacher = torch.randn(2, 16, 8, 10, requires_grad=True)
    loss = module(student, teacher)
    loss.backward()
    assert loss.shape == ()
    assert module.adaptor.weight.shape == (16, 8, 1, 1)
    assert module.adaptor.weight.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher is never trained through this loss
    adapted = torch.nn.functional.interpolate(
        module.adaptor(student), size=(8, 10), mode="bilinear", align_corners=False
    )
    assert_close(loss, channel_wise_distillation(adapted, teacher, 2.0))


def test_cwd_loss_without_adaptor_equals_function():
    module = CWDLoss(4, 4, tau=1.5)
    assert isinstance(module.adaptor, torch.nn.Identity)
    student, teacher = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    assert_close(module(student, teacher), channel_wise_distillation(student, teacher, 1.5))


def _pyramid(channels, k, generator, n=2):
    sizes = [(8, 8), (4, 4), (2, 2)]
    features = [torch.randn(n, channels, h, w, generator=generator) for h, w in sizes]
    logits = [torch.randn(n, k, h, w, generator=generator) for h, w in sizes]
    return features, logits


def test_detector_distill_terms_per_level():
    generator = torch.Generator().manual_seed(0)
    s_feat, s_logits = _pyramid(8, 2, generator)
    t_feat, t_logits = _pyramid(16, 2, generator)
    config = DistillConfig(
        kind="cwd", teacher="t.pt", tau=2.0, feature_weight=3.0, logit_weight=0.5
    )
    loss = DetectorDistillLoss(config, 8, 16, num_levels=3)
    terms = loss(s_feat, s_logits, t_feat, t_logits)
    assert sorted(terms) == sorted(
        [f"cwd_feat_p{i}" for i in (3, 4, 5)] + [f"cwd_logit_p{i}" for i in (3, 4, 5)]
    )
    for level in range(3):
        expected = 0.5 * channel_wise_distillation(s_logits[level], t_logits[level], 2.0)
        assert_close(terms[f"cwd_logit_p{level + 3}"], expected)
        adapted = loss.feature_losses[level].adaptor(s_feat[level])
        expected = 3.0 * channel_wise_distillation(adapted, t_feat[level], 2.0)
        assert_close(terms[f"cwd_feat_p{level + 3}"], expected)


def test_detector_kd_is_binary_kd_per_location():
    generator = torch.Generator().manual_seed(1)
    s_feat, s_logits = _pyramid(8, 3, generator)
    t_feat, t_logits = _pyramid(8, 3, generator)
    config = DistillConfig(kind="kd", teacher="t.pt", kd_tau=2.0, logit_weight=1.0)
    loss = DetectorDistillLoss(config, 8, 8, num_levels=3)
    assert len(list(loss.parameters())) == 0
    terms = loss(s_feat, s_logits, t_feat, t_logits)
    assert sorted(terms) == ["kd_logit_p3", "kd_logit_p4", "kd_logit_p5"]
    s, t = s_logits[1], t_logits[1]
    rows = [(s[n, :, y, x], t[n, :, y, x]) for n in range(2) for y in range(4) for x in range(4)]
    expected = _binary_kd_reference(
        torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), 2.0
    )
    assert_close(terms["kd_logit_p4"], expected)


def test_classifier_distillation_terms():
    generator = torch.Generator().manual_seed(2)
    s_logits, t_logits = (
        torch.randn(3, 2, generator=generator),
        torch.randn(3, 2, generator=generator),
    )
    s_cams, t_cams = torch.randn(3, 2, 7, 7, generator=generator), torch.randn(3, 2, 14, 14)
    terms = classifier_distillation(
        s_logits, t_logits, s_cams, t_cams, kd_tau=2.0, cam_tau=1.0, kd_weight=2.0
    )
    assert_close(terms["kd_logits"], 2.0 * kd_loss(s_logits, t_logits, 2.0))
    resized = torch.nn.functional.interpolate(s_cams, size=(14, 14), mode="bilinear")
    assert_close(terms["cwd_cam"], channel_wise_distillation(resized, t_cams, 1.0))
    assert list(classifier_distillation(s_logits, t_logits)) == ["kd_logits"]


def test_distill_config_validates():
    with pytest.raises(ValueError, match="none, kd or cwd"):
        DistillConfig(kind="fitnet")
    with pytest.raises(ValueError, match="positive"):
        DistillConfig(kind="cwd", tau=0)
