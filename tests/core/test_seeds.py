import pytest
import torch

from core.rsepm import IGNORE_INDEX
from core.seeds import (
    edge_predict_mix,
    edge_strength,
    normalize_max,
    pamr,
    pseudo_mask,
    rasterize_points,
    refine_seeds,
    self_correlation,
)

SEEDS = (0, 1, 2)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = max(a.norm().item(), 1e-6) * max(b.norm().item(), 1e-6)
    return float((a * b).sum()) / denom


def _reference_self_correlation(
    feature: torch.Tensor, t1: float, t2: float, center: bool
) -> torch.Tensor:
    """Double loops over positions of one image's (D, h, w) map."""
    d, h, w = feature.shape
    vectors = [feature[:, i, j] for i in range(h) for j in range(w)]
    if center:
        mean = sum(vectors) / len(vectors)
        vectors = [v - mean for v in vectors]
    p = len(vectors)
    first = torch.zeros(p, p)
    for a in range(p):
        for b in range(p):
            s = max(_cos(vectors[a], vectors[b]), 0.0)
            first[a, b] = s if s >= t1 else 0.0
    second = torch.zeros(p, p)
    for a in range(p):
        for b in range(p):
            s = max(_cos(first[a], first[b]), 0.0)
            second[a, b] = s if s >= t2 else 0.0
    return torch.maximum(first, second)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("center", [True, False])
def test_self_correlation_matches_double_loop(seed, center):
    gen = torch.Generator().manual_seed(seed)
    # Few channels so that many pairs fall on both sides of the thresholds.
    features = torch.randn(2, 3, 3, 4, generator=gen)
    got = self_correlation([features], 0.5, 0.1, center=center)
    for n in range(2):
        expected = _reference_self_correlation(features[n], 0.5, 0.1, center)
        torch.testing.assert_close(got[n], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_self_correlation_of_two_levels_is_their_maximum(seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 4, 3, 3, generator=gen)
    b = torch.randn(1, 5, 3, 3, generator=gen)
    both = self_correlation([a, b])
    torch.testing.assert_close(both, torch.maximum(self_correlation([a]), self_correlation([b])))
    assert torch.allclose(both, both.transpose(1, 2), atol=1e-6)


def _reference_refine(correlation, seeds, present, fg_t, bg_t):
    n, c, h, w = seeds.shape
    out = torch.zeros(n, c, h * w)
    for b in range(n):
        for k in range(c):
            flat = seeds[b, k].flatten()
            fg = [p for p in range(h * w) if flat[p] >= fg_t]
            bg = [p for p in range(h * w) if flat[p] < bg_t]
            if not present[b, k] or not fg:
                continue
            fg_map = torch.stack([correlation[b, p] for p in fg]).mean(0)
            bg_map = (
                torch.stack([correlation[b, p] for p in bg]).mean(0) if bg else torch.zeros(h * w)
            )
            fg_map = fg_map / (fg_map.max() + 1e-5)
            bg_map = bg_map / (bg_map.max() + 1e-5)
            diff = (fg_map - bg_map).clamp(min=0)
            out[b, k] = diff / (diff.max() + 1e-5)
    return out.view(n, c, h, w)


@pytest.mark.parametrize("seed", SEEDS)
def test_refine_seeds_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 6, 4, 4, generator=gen)
    correlation = self_correlation([features])
    seeds = torch.rand(2, 2, 4, 4, generator=gen) ** 2
    present = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    got = refine_seeds(correlation, seeds, present, 0.3, 0.05)
    torch.testing.assert_close(got, _reference_refine(correlation, seeds, present, 0.3, 0.05))
    assert got[0, 1].abs().sum() == 0  # absent class


def test_refine_seeds_spreads_a_seed_over_its_similar_region():
    # Two regions with distinct features: left columns and right columns.
    features = torch.zeros(1, 2, 2, 4)
    features[0, 0, :, :2] = 1.0
    features[0, 1, :, 2:] = 1.0
    seeds = torch.zeros(1, 1, 2, 4)
    seeds[0, 0, 0, 0] = 1.0  # one confident position in the left region
    refined = refine_seeds(self_correlation([features]), seeds, torch.ones(1, 1))
    assert torch.all(refined[0, 0, :, :2] > 0.99)
    assert torch.all(refined[0, 0, :, 2:] < 0.01)


def test_pseudo_mask_thresholds_and_ignore_band():
    refined = torch.tensor([[[[0.60, 0.30, 0.05]], [[0.20, 0.58, 0.02]]]])  # (1, 2, 1, 3)
    mask = pseudo_mask(refined, torch.ones(1, 2), fg_threshold=0.55, bg_threshold=0.10)
    # 0.60 fire beats 0.20 smoke -> fire; 0.58 smoke -> smoke; all below 0.10 -> background.
    assert mask.tolist() == [[[1, 2, 0]]]
    mask = pseudo_mask(torch.tensor([[[[0.54, 0.10, 0.09]]]]), torch.ones(1, 1))
    assert mask.tolist() == [[[IGNORE_INDEX, IGNORE_INDEX, 0]]]


def test_pseudo_mask_of_a_negative_image_is_all_background():
    refined = torch.rand(1, 2, 3, 3)
    assert pseudo_mask(refined, torch.zeros(1, 2)).eq(0).all()


def test_points_are_seeds_but_never_override_an_absent_tag():
    refined = torch.full((1, 2, 2, 2), 0.3)  # uncertain everywhere
    points = torch.zeros(1, 2, 2, 2)
    points[0, 0, 0, 0] = 1  # fire point, fire present
    points[0, 1, 1, 1] = 1  # smoke point, smoke absent
    mask = pseudo_mask(refined, torch.tensor([[1.0, 0.0]]), points)
    assert mask[0, 0, 0] == 1
    assert mask[0, 1, 1] == IGNORE_INDEX


def test_rasterize_points_draws_disks_of_the_class():
    seeds = rasterize_points([(1, 4.5, 2.5)], 2, 6, 8, radius=1.0)
    assert seeds[0].sum() == 0
    expected = {(2, 4), (1, 4), (3, 4), (2, 3), (2, 5)}
    assert {tuple(p) for p in seeds[1].nonzero().tolist()} == expected
    with pytest.raises(ValueError):
        rasterize_points([(2, 0, 0)], 2, 4, 4, 1.0)


def test_normalize_max_divides_each_map_by_its_peak():
    maps = torch.tensor([[[[2.0, -1.0]], [[0.5, 0.25]]]])
    torch.testing.assert_close(
        normalize_max(maps, eps=0.0), torch.tensor([[[[1.0, 0.0]], [[1.0, 0.5]]]])
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_edge_strength_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(1, 3, 4, 5, generator=gen), dim=1)
    got = edge_strength(probs)
    _, _, h, w = probs.shape
    for i in range(h):
        for j in range(w):
            best = 0.0
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ni, nj = min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1)
                best = max(best, float((probs[0, :, i, j] - probs[0, :, ni, nj]).abs().sum()))
            assert abs(got[0, i, j].item() - best) < 1e-5


def test_edge_predict_mix_on_hand_made_views():
    # View A draws a sharp edge between columns 1 and 2; view B a blurred ramp.
    fg_a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    fg_b = torch.tensor([0.0, 0.4, 0.6, 1.0])
    views = torch.stack(
        [torch.stack([1 - fg, fg])[None, :, None, :] for fg in (fg_a, fg_b)]
    )  # (V=2, N=1, K=2, H=1, W=4)
    mixed = edge_predict_mix(views, sharpness=10.0)
    # On the edge, the sharp view wins: the mix is nearer A than the plain mean.
    mean = views.mean(dim=0)
    assert abs(mixed[0, 1, 0, 1] - fg_a[1]) < abs(mean[0, 1, 0, 1] - fg_a[1])
    assert abs(mixed[0, 1, 0, 2] - fg_a[2]) < abs(mean[0, 1, 0, 2] - fg_a[2])
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(1, 1, 4))
    # Sharpness 0 is the plain mean; identical views give themselves back.
    torch.testing.assert_close(edge_predict_mix(views, sharpness=0.0), mean)
    same = torch.stack([views[0], views[0]])
    torch.testing.assert_close(edge_predict_mix(same), views[0])


def test_pamr_keeps_constant_masks_and_follows_colour_edges():
    image = torch.zeros(1, 3, 6, 6)
    image[:, :, :, 3:] = 1.0
    constant = torch.full((1, 1, 6, 6), 0.7)
    torch.testing.assert_close(pamr(image, constant, iterations=3), constant)
    mask = torch.zeros(1, 1, 6, 6)
    mask[:, :, :, 2:] = 1.0  # one column too wide, across the colour edge
    refined = pamr(image, mask, iterations=10, dilations=(1,))
    assert refined[0, 0, :, 3:].min() > 0.9
    assert refined[0, 0, :, 2].mean() < 0.5
