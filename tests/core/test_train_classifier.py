import math

import pytest
import torch

from core.classifier_data import ClassifierDataset, ClassifierSample, to_binary
from core.rsepm import IGNORE_INDEX, build_rsepm, load_rsepm
from core.train_classifier import (
    ClassifierConfig,
    NonFiniteLossError,
    TrainCallback,
    make_pseudo_masks,
    save_for_inference,
    train_classifier,
    training_losses,
)

CLASSES = ["fire", "smoke"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def samples(tmp_path, make_image):
    out = []
    for i in range(6):
        path = make_image(tmp_path / f"img{i}.png", (40, 30), seed=i)
        tags = (float(i % 2), float(i % 3 == 0))
        points = ((0, 20.0, 15.0),) if i == 1 else ()
        out.append(ClassifierSample(str(path), tags, points))
    return out


def _config(**overrides) -> ClassifierConfig:
    base = dict(
        image_size=32,
        epochs=3,
        batch_size=3,
        warmup_epochs=1,
        recursion_start_epoch=2,
        num_workers=0,
        seg_channels=8,
        lr_warmup_steps=2,
    )
    base.update(overrides)
    return ClassifierConfig(**base)


def test_dataset_items_and_points_follow_the_flip(samples):
    dataset = ClassifierDataset(samples, 2, image_size=32, augment=False, point_radius_frac=0.1)
    item = dataset[1]
    assert item["image"].shape == (3, 32, 32)
    assert item["tags"].tolist() == [1.0, 0.0]
    # Point (20, 15) of a 40x30 image -> (16, 16) at 32 px; a disk of radius 3.2 around it.
    ys, xs = item["point_seeds"][0].nonzero(as_tuple=True)
    assert abs(xs.float().mean() + 0.5 - 16) < 0.6 and abs(ys.float().mean() + 0.5 - 16) < 0.6
    assert item["point_seeds"][1].sum() == 0
    # Augmented items repeat for the same (seed, epoch, index) and change with the epoch.
    augmented = ClassifierDataset(samples, 2, image_size=32, seed=5)
    first = augmented[2]["image"]
    torch.testing.assert_close(augmented[2]["image"], first)
    augmented.set_epoch(1)
    assert not torch.equal(augmented[2]["image"], first)


def test_an_unreadable_image_is_skipped_with_unknown_tags(tmp_path, caplog):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    item = ClassifierDataset([ClassifierSample(str(bad), (1.0, 0.0))], 2, image_size=32)[0]
    assert item["tags"].tolist() == [-1.0, -1.0]
    assert item["image"].shape == (3, 32, 32)
    assert "broken.jpg" in caplog.text


def test_points_of_absent_classes_are_dropped(tmp_path, make_image):
    path = make_image(tmp_path / "a.png", (32, 32))
    sample = ClassifierSample(str(path), (0.0, 1.0), ((0, 10.0, 10.0),))
    item = ClassifierDataset([sample], 2, image_size=32, augment=False)[0]
    assert item["point_seeds"].sum() == 0


def test_to_binary_marks_any_class_present():
    binary = to_binary(
        [ClassifierSample("a", (0.0, 1.0), ((1, 2.0, 3.0),)), ClassifierSample("b", (0.0, 0.0))]
    )
    assert [s.tags for s in binary] == [(1.0,), (0.0,)]
    assert binary[0].points == ((0, 2.0, 3.0),)
    unknown = to_binary([ClassifierSample("c", (0.0, -1.0)), ClassifierSample("d", (-1.0, 1.0))])
    assert [s.tags for s in unknown] == [(-1.0,), (1.0,)]


def test_pseudo_masks_of_negative_images_are_background():
    torch.manual_seed(0)
    cams = torch.randn(2, 2, 4, 4)
    seg = torch.randn(2, 3, 16, 16)
    features = [torch.randn(2, 8, 4, 4)]
    tags = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    points = torch.zeros(2, 2, 64, 64, dtype=torch.uint8)
    mask = make_pseudo_masks(cams, seg, features, tags, points, _config(), recursive=True)
    assert mask.shape == (2, 16, 16)
    assert mask[0].eq(0).all()
    # The second image holds fire only: its labels are background, fire or ignored.
    assert set(mask[1].unique().tolist()) <= {0, 1, IGNORE_INDEX}
    # No class present but smoke unknown: not a negative image, so nothing is certain.
    tags = torch.tensor([[0.0, -1.0], [1.0, -1.0]])
    mask = make_pseudo_masks(cams, seg, features, tags, points, _config(), recursive=False)
    assert mask[0].eq(IGNORE_INDEX).all()
    assert not mask[1].eq(IGNORE_INDEX).all()


def test_losses_by_stage_and_a_few_steps_reduce_them(samples):
    torch.manual_seed(0)
    config = _config()
    model = build_rsepm("resnet10", 2, seg_channels=8)
    dataset = ClassifierDataset(samples[:4], 2, image_size=32, augment=False)
    batch = {
        k: torch.stack([dataset[i][k] for i in range(4)]) for k in ("image", "tags", "point_seeds")
    }
    assert set(training_losses(model, batch, 0, config)) == {"cls"}
    assert set(training_losses(model, batch, 1, config)) == {"cls", "seg"}
    assert set(training_losses(model, batch, 2, config)) == {"cls", "seg", "cam"}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(6):
        losses = training_losses(model, batch, 1, config)
        total = losses["cls"] + losses["seg"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total.detach()))
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < totals[0]


class _StopAt(TrainCallback):
    def __init__(self, epoch: int, step: int):
        self.target = (epoch, step)
        self.seen = None
        self.steps, self.epochs = [], []

    def on_step(self, info):
        self.seen = (info.epoch, info.step)
        self.steps.append(info)

    def on_epoch_end(self, info):
        self.epochs.append(info)

    def should_stop(self):
        return self.seen == self.target


def test_interrupt_and_resume_give_the_uninterrupted_weights(samples, tmp_path):
    config = _config()
    straight = train_classifier(config, samples, CLASSES, tmp_path / "straight")
    assert straight.epochs_completed == 3 and not straight.interrupted
    assert [h["stage"] for h in straight.history] == ["warm-up", "cam seeds", "recursion"]
    assert set(straight.history[2]) >= {"cls", "seg", "cam", "total"}

    # Stop in the middle of the second epoch, then resume.
    stopper = _StopAt(epoch=1, step=0)
    stopped = train_classifier(config, samples, CLASSES, tmp_path / "resumed", callback=stopper)
    assert stopped.interrupted and stopped.epochs_completed == 1
    checkpoint = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "config", "epoch", "best_metric"} <= set(checkpoint)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 1)
    assert checkpoint["classes"] == CLASSES and checkpoint["arch"] == "resnet10"

    resumed = train_classifier(config, samples, CLASSES, tmp_path / "resumed", resume=True)
    assert resumed.epochs_completed == 3 and not resumed.interrupted
    resumed_state = resumed.model.state_dict()
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed_state[name], value, msg=f"{name} differs after resume")
    assert (tmp_path / "resumed" / "best.pt").is_file()


def test_callbacks_see_every_step_with_per_term_losses(samples, tmp_path):
    callback = _StopAt(epoch=-1, step=-1)
    train_classifier(_config(epochs=2), samples, CLASSES, tmp_path / "run", callback=callback)
    assert len(callback.steps) == 4 and len(callback.epochs) == 2
    assert set(callback.steps[-1].losses) == {"cls", "seg", "total"}
    assert callback.epochs[0].stage == "warm-up"


def test_non_finite_loss_names_the_term(samples, tmp_path):
    broken = [ClassifierSample(s.path, (float("nan"), 0.0)) for s in samples]
    with pytest.raises(NonFiniteLossError, match="non-finite cls loss"):
        train_classifier(_config(epochs=1), broken, CLASSES, tmp_path / "run")


def test_resume_without_checkpoint_and_bad_config_fail_clearly(samples, tmp_path):
    with pytest.raises(FileNotFoundError, match="without --resume"):
        train_classifier(_config(), samples, CLASSES, tmp_path / "none", resume=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        _config(image_size=30)
    with pytest.raises(ValueError, match="no training samples"):
        train_classifier(_config(), [], CLASSES, tmp_path / "none")


def test_training_samples_shape_is_checked(tmp_path):
    with pytest.raises(ValueError, match="3 tags for 2 classes"):
        ClassifierDataset([ClassifierSample("a.png", (1.0, 0.0, 0.0))], 2)


def test_saved_for_inference_loads_and_predicts_like_the_trained_network(samples, tmp_path):
    result = train_classifier(_config(epochs=1), samples, CLASSES, tmp_path / "run")
    slim_path = tmp_path / "slim.pt"
    save_for_inference(tmp_path / "run" / "last.pt", slim_path)

    slim = torch.load(slim_path, weights_only=False)
    assert "optimizer" not in slim and "scheduler" not in slim
    assert slim["classes"] == CLASSES
    assert all(v.dtype != torch.float32 for v in slim["model"].values())
    assert slim_path.stat().st_size < (tmp_path / "run" / "last.pt").stat().st_size / 2

    loaded, _ = load_rsepm(slim_path)
    trained = result.model.cpu().eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained(images), loaded(images)
    # float16 weights: logits agree to about three significant digits.
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-2, atol=1e-2)


def test_distilled_student_learns_the_teachers_logits_and_cams(samples, tmp_path):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    train_classifier(_config(epochs=1, seed=1), samples, CLASSES, teacher_dir)
    teacher, _ = load_rsepm(teacher_dir / "last.pt")

    # Only the distillation terms: the student has nothing to learn but the teacher.
    config = _config(
        epochs=4,
        lr=1e-2,
        cls_weight=0.0,
        seg_weight=0.0,
        cam_weight=0.0,
        teacher=str(teacher_dir / "last.pt"),
    )
    result = train_classifier(config, samples, CLASSES, student_dir)
    first, last = result.history[0], result.history[-1]
    assert {"kd_logits", "cwd_cam"} <= set(first) and {"kd_logits", "cwd_cam"} <= set(last)
    assert last["kd_logits"] < first["kd_logits"]
    assert last["cwd_cam"] < first["cwd_cam"]
    # The checkpoint remembers its teacher, so a resumed run distils from the same one.
    assert load_rsepm(student_dir / "last.pt")[1]["config"]["teacher"] == config.teacher


def test_teacher_of_other_classes_is_refused(samples, tmp_path):
    train_classifier(_config(epochs=1), samples, CLASSES, tmp_path / "teacher")
    config = _config(epochs=1, teacher=str(tmp_path / "teacher" / "last.pt"))
    with pytest.raises(ValueError, match="teacher .* predicts"):
        train_classifier(config, samples, ["fire", "smoke2"], tmp_path / "student")
    with pytest.raises(FileNotFoundError, match="train the teacher first"):
        train_classifier(_config(teacher=str(tmp_path / "none.pt")), samples, CLASSES, tmp_path)
