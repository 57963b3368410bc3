import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

import core.train_detector as train_module
from core.detection_data import DetectionDataset, clip_name, split_by_clip
from core.distill import DistillConfig
from core.train_detector import (
    DetectorTrainConfig,
    evaluate_detector,
    ground_truth,
    load_detector,
    predict_detections,
    train_detector,
)

CLASSES = ["fire", "smoke"]


def _write_samples(folder, count=6, size=(96, 72), seed=0):
    """Images with one bright rectangle each (every third image is a negative)."""
    rng = np.random.default_rng(seed)
    samples = []
    width, height = size
    for index in range(count):
        pixels = (rng.random((height, width, 3)) * 40).astype(np.uint8)
        boxes, labels = [], []
        if index % 3 != 2:
            x1, y1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            x2, y2 = x1 + int(rng.integers(16, width // 2)), y1 + int(rng.integers(16, height // 2))
            pixels[y1:y2, x1:x2] = 230
            boxes.append((x1, y1, x2, y2))
            labels.append(index % 2)
        path = folder / f"clip{index // 2}_mp4-{index}_jpg_x.png"
        Image.fromarray(pixels).save(path)
        samples.append((str(path), np.array(boxes, np.float32).reshape(-1, 4), np.array(labels)))
    return samples


def _config(**overrides):
    values = dict(
        variant="tiny-student",
        epochs=2,
        batch_size=2,
        image_size=64,
        lr=0.01,
        warmup_steps=2,
        seed=0,
        device="cpu",
    )
    values.update(overrides)
    return DetectorTrainConfig(**values)


def _same_parameters(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert_close(x, y, msg=name)


@pytest.fixture
def samples(tmp_path):
    return _write_samples(tmp_path)


def test_checkpoint_holds_everything_and_resume_is_exact(tmp_path, samples):
    straight = train_detector(_config(), samples, CLASSES, checkpoint_path=tmp_path / "a.pt")
    checkpoint = torch.load(tmp_path / "a.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "config", "epoch", "best_metric"):
        assert key in checkpoint
    assert checkpoint["epoch"] == 2 and checkpoint["class_names"] == CLASSES

    # Stop after the first of three steps per epoch, then resume from that checkpoint.
    calls = iter([False, False, False, True])
    cancelled = train_detector(
        _config(), samples, CLASSES, checkpoint_path=tmp_path / "c.pt",
        should_cancel=lambda: next(calls, False),
    )  # fmt: skip
    assert cancelled.cancelled
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 1)
    resumed = train_detector(
        _config(),
        samples,
        CLASSES,
        checkpoint_path=tmp_path / "c.pt",
        resume_from=tmp_path / "c.pt",
    )
    assert not resumed.cancelled
    _same_parameters(resumed.model, straight.model)

    loaded, _ = load_detector(tmp_path / "a.pt", "cpu")
    _same_parameters(loaded, straight.model)


def test_progress_reports_terms_and_eta(samples):
    reports = []
    train_detector(_config(epochs=1), samples, CLASSES, progress=reports.append, stage="teacher")
    assert [r.step for r in reports] == [1, 2, 3]
    assert all(r.stage == "teacher" and r.epochs == 1 for r in reports)
    assert {"classification", "bbox_regression", "bbox_ctrness", "total"} <= set(reports[0].losses)
    assert reports[-1].eta_seconds == pytest.approx(0.0, abs=1e-6)
    assert reports[0].eta_seconds > 0
    assert reports[-1].fraction == 1.0


def test_non_finite_loss_stops_and_names_the_term(samples, monkeypatch):
    real_forward = train_module.detector_forward

    def poisoned(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.losses["bbox_ctrness"] = out.losses["bbox_ctrness"] * float("nan")
        return out

    monkeypatch.setattr(train_module, "detector_forward", poisoned)
    with pytest.raises(FloatingPointError, match="bbox_ctrness"):
        train_detector(_config(epochs=1), samples, CLASSES)


def test_distilled_student_logs_each_term(tmp_path, samples):
    train_detector(
        _config(variant="tiny-teacher", epochs=1),
        samples,
        CLASSES,
        checkpoint_path=tmp_path / "t.pt",
    )
    reports = []
    distill = DistillConfig(kind="cwd", teacher=str(tmp_path / "t.pt"), feature_weight=1.0)
    result = train_detector(
        _config(epochs=1, distill=distill),
        samples,
        CLASSES,
        checkpoint_path=tmp_path / "s.pt",
        progress=reports.append,
    )
    terms = reports[0].losses
    for level in ("p3", "p4", "p5", "p6", "p7"):
        assert f"cwd_feat_{level}" in terms and f"cwd_logit_{level}" in terms
    expected = sum(value for name, value in terms.items() if name != "total")
    assert terms["total"] == pytest.approx(expected, rel=1e-5)
    # The checkpoint holds only the student, loadable without the teacher.
    loaded, checkpoint = load_detector(tmp_path / "s.pt", "cpu")
    assert checkpoint["variant"] == "tiny-student"
    _same_parameters(loaded, result.model)


class _BrightBoxDetector(torch.nn.Module):
    """Finds the box around bright pixels of the resized image it is given: a detector that is
    right by construction, to check the mapping back to original pixels."""

    def __init__(self, image_size):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.transform = type("T", (), {"max_size": image_size})()

    def forward(self, images):
        outputs = []
        for image in images:
            ys, xs = torch.where(image.mean(0) > 0.5)
            if len(xs) == 0:
                outputs.append(
                    {
                        "boxes": torch.zeros(0, 4),
                        "labels": torch.zeros(0).long(),
                        "scores": torch.zeros(0),
                    }
                )
                continue
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            outputs.append(
                {"boxes": box[None], "labels": torch.tensor([0]), "scores": torch.ones(1)}
            )
        return outputs


def test_predictions_come_back_in_original_pixels(tmp_path):
    samples = [s for s in _write_samples(tmp_path, count=6, size=(200, 120)) if len(s[1])]
    samples = [(path, boxes, np.zeros(len(boxes), np.int64)) for path, boxes, _ in samples]
    predictions = predict_detections(_BrightBoxDetector(64), samples, batch_size=3)
    for prediction, (path, boxes, _) in zip(predictions, samples, strict=True):
        assert prediction["image_id"] == path
        # One resized pixel is 200 / 64 original pixels; bilinear edges may move a box by one.
        assert_close(
            torch.tensor(prediction["boxes"]), torch.from_numpy(boxes), atol=2 * 200 / 64, rtol=0
        )
    metrics = evaluate_detector(_BrightBoxDetector(64), samples, ["fire"])
    assert metrics["AP50"] == pytest.approx(1.0)
    truth = ground_truth(samples)
    assert (truth[0]["width"], truth[0]["height"]) == (200, 120)


def test_augmentation_keeps_boxes_on_the_object(tmp_path):
    samples = [s for s in _write_samples(tmp_path, count=3, size=(96, 96)) if len(s[1])]
    dataset = DetectionDataset(samples, 96, augment=True, scale_range=(0.7, 1.3), seed=1)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            image, target, _ = dataset[index]
            assert image.shape == (3, 96, 96)
            for x1, y1, x2, y2 in target["boxes"].round().int().tolist():
                inside = image[:, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].mean(0)
                assert inside.numel() == 0 or inside.min() > 0.7
            again, _, _ = dataset[index]
            assert_close(image, again)  # same (seed, epoch, index), same augmentation


def test_clip_split_never_splits_a_clip():
    names = [f"a_mp4-{i}_jpg_x.jpg" for i in range(5)] + [
        f"img_{i}_jpg_y.jpg" for i in range(0, 400, 7)
    ]
    samples = [(name, np.zeros((0, 4)), np.zeros(0)) for name in names]
    train, held = split_by_clip(samples, holdout=0.3, seed=0)
    assert len(train) + len(held) == len(samples)
    assert not {clip_name(s[0]) for s in train} & {clip_name(s[0]) for s in held}
    assert clip_name("img_123_jpg_ab.jpg") == "img_block1"
    assert clip_name("pexels-alan_mp4-12_jpg_ab.jpg") == "pexels-alan"
