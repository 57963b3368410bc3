"""The stages of a retrain job: what each one reads from the workspace, trains, and registers.

    teacher     trains the server (or tiny) detector on the frozen curated set
    student     trains the edge (or tiny) detector, distilled from the teacher (CWD or KD)
    evaluation  scores this job's models on the evaluation split (see evaluate_model)
    classifier  retrains the CAM classifier on the workspace's tags and points
    proposals   proposes new pseudo boxes with the newest classifier

Each stage is `stage(ctx: app.jobs.StageContext) -> dict`; the dict lands in Job.results, so
a resumed job skips the stage. Training stages write their checkpoint to the job's folder
(models/job-<id>/) after every epoch and on a cancel, and resume from it when it is there.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from app.jobs import JobCancelled, StageContext
from db.curation import ROLE_EVAL, ROLE_NEGATIVE, ROLE_TRAIN, FrozenItem, dataset_items
from db.models import ModelVersion
from db.workspace import Workspace

log = logging.getLogger(__name__)

# A rejected false positive "still fires" when the new model puts a box of the same class, at or
# above the job's score threshold, over at least this IoU with the rejected box: the same spot,
# not merely somewhere on an image that may also hold real fire.
STILL_FIRES_IOU = 0.3

# Pretrained backbones for the full-size variants; core.weights falls back to random
# initialisation, with a warning, when they are not in the local cache.
PRETRAINED = {"server": "torchvision", "edge": "torchvision"}


# ----------------------------------------------------------------------------------------------
# Reading the frozen set.


def detection_samples(
    workspace: Workspace, items: Sequence[FrozenItem]
) -> list[tuple[str, list[list[float]], list[int]]]:
    """Frozen items as core.detection_data samples: (absolute path, boxes (N, 4) x1y1x2y2
    original pixels, labels (N,)). Training items with points but no box are left out: an
    image with an unboxed object is not a negative, and the detector cannot learn a point."""
    samples = []
    for item in items:
        if item.role == ROLE_TRAIN and not item.boxes:
            continue
        boxes = [box[:4] for box in item.boxes]
        labels = [int(box[4]) for box in item.boxes]
        samples.append((str(workspace.absolute(item.path)), boxes, labels))
    return samples


def _frozen(ctx: StageContext, roles: Sequence[str]) -> list[FrozenItem]:
    with ctx.workspace.session() as session:
        return dataset_items(
            session, dataset_version_id=ctx.results["dataset_version_id"], roles=roles
        )


def _register(workspace: Workspace, **values: Any) -> int:
    with workspace.transaction() as session:
        version = ModelVersion(**values)
        session.add(version)
        session.flush()
        return version.id


def latest_model(workspace: Workspace, kind: str) -> ModelVersion | None:
    with workspace.session() as session:
        return session.scalar(
            select(ModelVersion).where(ModelVersion.kind == kind).order_by(ModelVersion.id.desc())
        )


# ----------------------------------------------------------------------------------------------
# Detectors.


def _progress_callback(ctx: StageContext) -> Callable[[Any], None]:
    """Forward core.train_detector's TrainProgress to the job row."""

    def on_progress(progress) -> None:
        ctx.report(
            fraction=progress.fraction,
            epoch=progress.epoch,
            step=progress.step,
            losses=progress.losses,
            eta_s=progress.eta_seconds,
        )

    return on_progress


def _train_detector_stage(
    ctx: StageContext, *, kind: str, variant: str, distill: dict[str, Any] | None = None
) -> dict[str, Any]:
    from core.distill import DistillConfig
    from core.train_detector import DetectorTrainConfig, train_detector

    options = ctx.options
    classes = ctx.workspace.classes()
    samples = detection_samples(ctx.workspace, _frozen(ctx, (ROLE_TRAIN, ROLE_NEGATIVE)))
    boxed = sum(1 for _, boxes, _ in samples if boxes)
    if boxed == 0:
        raise RuntimeError(
            "the curated set has no box to train on: accept or draw boxes in the review app "
            "(or ingest boxes) in a training split first"
        )
    missing = [path for path, _, _ in samples if not Path(path).is_file()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} image(s) of the curated set are missing, e.g. {missing[0]}; "
            "ingest the moved folder again (images are recognised by content)"
        )
    log.info(
        "%s: %d images (%d with boxes, %d negatives)",
        kind,
        len(samples),
        boxed,
        len(samples) - boxed,
    )

    config = DetectorTrainConfig(variant=variant, seed=options.seed, device=options.device)
    config.weights = PRETRAINED.get(variant)
    if options.epochs is not None:
        config.epochs = options.epochs
    if options.batch_size is not None:
        config.batch_size = options.batch_size
    if options.image_size is not None:
        config.image_size = options.image_size
    if distill is not None:
        config.distill = DistillConfig(**distill)
    # One step of a tiny set is shorter than the default warm-up; keep warm-up below the run.
    steps = config.epochs * math.ceil(len(samples) / config.batch_size)
    config.warmup_steps = min(config.warmup_steps, max(1, steps // 4))

    checkpoint = ctx.work_dir / f"{kind}.pt"
    resume_from = checkpoint if checkpoint.is_file() else None
    if resume_from is not None:
        log.info("%s: resuming from %s", kind, checkpoint)
    result = train_detector(
        config,
        samples,
        classes,
        checkpoint_path=checkpoint,
        resume_from=resume_from,
        progress=_progress_callback(ctx),
        should_cancel=ctx.should_stop,
        stage=kind,
    )
    if result.cancelled:
        raise JobCancelled(f"{kind} cancelled at epoch {result.epochs_done + 1}")
    return {
        "checkpoint": ctx.workspace.relative(checkpoint),
        "config": asdict(config),
        "epochs": result.epochs_done,
        "images": len(samples),
    }


def teacher_stage(ctx: StageContext) -> dict[str, Any]:
    trained = _train_detector_stage(ctx, kind="teacher", variant=ctx.options.teacher)
    version_id = _register(
        ctx.workspace,
        kind="teacher",
        arch=ctx.options.teacher,
        path=trained["checkpoint"],
        classes=ctx.workspace.classes(),
        config=trained["config"],
        dataset_version_id=ctx.results["dataset_version_id"],
        job_id=ctx.job_id,
    )
    return {"model_version_id": version_id, **trained}


def _teacher_for_student(ctx: StageContext) -> tuple[int | None, Path | None]:
    """This job's teacher, else the newest registered teacher."""
    if "teacher" in ctx.results:
        teacher = ctx.results["teacher"]
        return teacher["model_version_id"], ctx.workspace.absolute(teacher["checkpoint"])
    latest = latest_model(ctx.workspace, "teacher")
    if latest is None:
        return None, None
    return latest.id, ctx.workspace.absolute(latest.path)


def student_stage(ctx: StageContext) -> dict[str, Any]:
    teacher_id, teacher_path = _teacher_for_student(ctx)
    distill = None
    if ctx.options.distill != "none":
        if teacher_path is None or not teacher_path.is_file():
            raise RuntimeError(
                "no teacher to distil from: add the teacher stage (--stages teacher,student) "
                "or use --distill none"
            )
        distill = ctx.options.distill_config(str(teacher_path))
    trained = _train_detector_stage(
        ctx, kind="student", variant=ctx.options.student, distill=distill
    )
    version_id = _register(
        ctx.workspace,
        kind="student",
        arch=ctx.options.student,
        path=trained["checkpoint"],
        classes=ctx.workspace.classes(),
        config=trained["config"],
        dataset_version_id=ctx.results["dataset_version_id"],
        job_id=ctx.job_id,
        parent_id=teacher_id if distill else None,
    )
    return {"model_version_id": version_id, "teacher_model_version_id": teacher_id, **trained}


# ----------------------------------------------------------------------------------------------
# Classifier and proposals: new pseudo boxes for reviewers, from the newest tags and points.


def _training_splits(workspace: Workspace, eval_splits: Sequence[str]) -> list[str]:
    from db.models import Image

    with workspace.session() as session:
        splits = session.scalars(select(Image.split).distinct())
        return sorted(split for split in splits if split not in set(eval_splits))


def classifier_stage(ctx: StageContext) -> dict[str, Any]:
    """Retrain the RS+EPM classifier on the tags and points of every training split, as they
    are now (db.proposals.training_images decides what counts, as for `pyrolabel train
    classifier`)."""
    from core.classifier_data import ClassifierSample
    from core.train_classifier import ClassifierConfig, TrainCallback, train_classifier
    from db.proposals import training_images

    options = ctx.options
    splits = _training_splits(ctx.workspace, options.eval_splits)
    with ctx.workspace.session() as session:
        classes = ctx.workspace.classes(session)
        images = training_images(session, splits=splits)
    samples = [
        ClassifierSample(
            str(ctx.workspace.absolute(image.path)),
            tuple(float(image.tags[name]) if name in image.tags else -1.0 for name in classes),
            tuple((classes.index(name), x, y) for name, x, y in image.points),
        )
        for image in images
    ]
    if not samples:
        raise RuntimeError(
            f"no tagged image in the training splits ({', '.join(splits) or 'none'}); ingest "
            "tags first, or leave the classifier stage out"
        )

    config = ClassifierConfig(seed=options.seed, device=options.device)
    if options.epochs is not None:
        # Warm-up and recursion keep their share of the run, as `train classifier` does.
        defaults = ClassifierConfig()
        config.epochs = options.epochs
        config.warmup_epochs = round(options.epochs * defaults.warmup_epochs / defaults.epochs)
        config.recursion_start_epoch = max(
            config.warmup_epochs,
            round(options.epochs * defaults.recursion_start_epoch / defaults.epochs),
        )
    if options.image_size is not None:
        config.image_size = max(32, round(options.image_size / 16) * 16)  # output stride 16
    if options.batch_size is not None:
        config.batch_size = options.batch_size
    config.num_workers = 0  # the worker is one process; data loading processes only compete

    class JobProgress(TrainCallback):
        def on_step(self, info) -> None:
            done = info.epoch * info.steps_per_epoch + info.step + 1
            ctx.report(
                fraction=done / (config.epochs * info.steps_per_epoch),
                epoch=info.epoch + 1,
                step=info.step + 1,
                losses=info.losses,
            )

        def should_stop(self) -> bool:
            return ctx.should_stop()

    output_dir = ctx.work_dir / "classifier"
    resume = (output_dir / "last.pt").is_file()
    result = train_classifier(
        config, samples, classes, output_dir, resume=resume, callback=JobProgress()
    )
    if result.interrupted:
        raise JobCancelled(f"classifier cancelled in epoch {result.epochs_completed + 1}")
    final = result.history[-1] if result.history else {}
    version_id = _register(
        ctx.workspace,
        kind="classifier",
        arch=config.arch,
        path=ctx.workspace.relative(result.checkpoint_path),
        classes=classes,
        config=asdict(config),
        metrics={
            "final_losses": {k: v for k, v in final.items() if k not in ("epoch", "stage")},
            "samples": len(samples),
            "splits": splits,
            "history": result.history,
        },
        job_id=ctx.job_id,
    )
    return {"model_version_id": version_id, "images": len(samples), "splits": splits}


def proposals_stage(ctx: StageContext) -> dict[str, Any]:
    """Propose pseudo boxes on every image with the newest classifier, by running `pyrolabel
    propose` itself (it commits as it goes and continues an interrupted run)."""
    import argparse
    import contextlib
    import io

    from app.commands import propose
    from db.models import Image, ProposalImage, ProposalRun

    parser = propose.add_parser(argparse.ArgumentParser().add_subparsers())
    args = parser.parse_args(["--workers", "0"])
    args.device = ctx.options.device
    if "classifier" in ctx.results:
        args.model = ctx.results["classifier"]["model_version_id"]
    with ctx.workspace.session() as session:
        total = session.scalar(select(func.count(Image.id))) or 1
        before = session.scalar(select(func.max(ProposalRun.id))) or 0

    # `propose` has no progress hook: count the images its newest run has stored so far.
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(2.0):
            with ctx.workspace.session() as session:
                done = session.scalar(
                    select(func.count(ProposalImage.id)).where(
                        ProposalImage.run_id == select(func.max(ProposalRun.id)).scalar_subquery()
                    )
                )
            ctx.report(fraction=(done or 0) / total, step=done)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = io.StringIO()
    try:
        with ctx.interruptible(), contextlib.redirect_stdout(output):
            code = propose.run(args, ctx.workspace)
    finally:
        stop.set()
        watcher.join()
        log.info("propose: %s", output.getvalue().strip())
    if code != 0:
        raise RuntimeError(f"propose failed (exit {code}); see the job log")
    with ctx.workspace.session() as session:
        run_id = session.scalar(select(func.max(ProposalRun.id)))
    return {"proposal_run_id": run_id, "new_run": (run_id or 0) > before}


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def still_fires(
    rejected: Sequence[Sequence[Any]],
    prediction: dict[str, Any],
    score_threshold: float,
    iou_threshold: float = STILL_FIRES_IOU,
) -> set[str]:
    """Reasons of the rejected boxes (x1, y1, x2, y2, class_index, reason) on one image that
    the model still fires on: a predicted box of that class, scoring >= score_threshold, with
    IoU >= iou_threshold."""
    reasons = set()
    for *box, class_index, reason in rejected:
        for pred_box, label, score in zip(
            prediction["boxes"], prediction["labels"], prediction["scores"], strict=True
        ):
            if label == class_index and score >= score_threshold:
                if _iou(box, pred_box) >= iou_threshold:
                    reasons.add(reason)
                    break
    return reasons


def _json_safe(value: Any) -> Any:
    """NaN and infinities become None: PostgreSQL's JSON rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    return value


def evaluate_predictions(
    eval_items: Sequence[FrozenItem],
    rejected_items: Sequence[FrozenItem],
    predictions: dict[int, dict[str, Any]],
    classes: Sequence[str],
    *,
    score_threshold: float,
) -> dict[str, Any]:
    """The numbers the Models page shows for one model.

    Args:
        eval_items: the evaluation split's frozen items (their boxes are the truth).
        rejected_items: items carrying boxes reviewers rejected as false positives (any role).
        predictions: image id -> {"boxes", "labels", "scores"} (x1y1x2y2 original pixels).
        score_threshold: a box at or above it fires (false alarms, rejected images).

    Returns:
        {"AP", "AP50", "per_class": {class: {"AP", "AP50"}}, "false_alarm": {class|"any":
        {"rate", "false_alarms", "images"}}, "rejected_still_fire": {reason: {"images",
        "still_fire", "rate"}}, "rejected_still_fire_held_out": the same over evaluation
        images only, "pr_curves": {class: {"recall", "precision"}} (AP50), "eval_images": n}.
        NaN (undefined) values are stored as None.
    """
    from core.metrics import classes_with_boxes, coco_box_ap, false_alarm_rate, pr_curve

    empty = {"boxes": [], "labels": [], "scores": []}
    gt = [
        {
            "image_id": item.image_id,
            "width": item.width,
            "height": item.height,
            "boxes": [box[:4] for box in item.boxes],
            "labels": [int(b[4]) for b in item.boxes],
        }
        for item in eval_items
    ]
    eval_predictions = [
        {"image_id": item.image_id, **predictions.get(item.image_id, empty)} for item in eval_items
    ]
    metrics: dict[str, Any] = {"eval_images": len(eval_items), "score_threshold": score_threshold}
    if eval_items:
        metrics.update(coco_box_ap(gt, eval_predictions, classes))
        curves = pr_curve(gt, eval_predictions, classes, iou_threshold=0.5)
        metrics["pr_curves"] = {
            name: {"recall": c["recall"].round(4), "precision": c["precision"].round(4)}
            for name, c in curves.items()
        }
        present = {
            item.image_id: {classes[int(b[4])] for b in item.boxes}
            | {name for name, value in item.tags.items() if value}
            for item in eval_items
        }
        fired = classes_with_boxes(eval_predictions, classes, score_threshold=score_threshold)
        metrics["false_alarm"] = false_alarm_rate(present, fired, classes)

    for key, held_out_only in (
        ("rejected_still_fire", False),
        ("rejected_still_fire_held_out", True),
    ):
        counts: dict[str, dict[str, int]] = defaultdict(lambda: {"images": 0, "still_fire": 0})
        for item in rejected_items:
            if held_out_only and item.role != ROLE_EVAL:
                continue
            fires = still_fires(
                item.rejected, predictions.get(item.image_id, empty), score_threshold
            )
            for reason in {r[5] for r in item.rejected}:
                counts[reason]["images"] += 1
                counts[reason]["still_fire"] += reason in fires
        metrics[key] = {
            reason: {**c, "rate": c["still_fire"] / c["images"]} for reason, c in counts.items()
        }
    return _json_safe(metrics)


def evaluate_model(
    workspace: Workspace,
    model_version_id: int,
    dataset_version_id: int,
    *,
    score_threshold: float,
    device: str | None = None,
    batch_size: int = 8,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Score one registered detector on a frozen dataset version (see evaluate_predictions),
    and store the result in ModelVersion.metrics."""
    from core.train_detector import load_detector, predict_detections

    with workspace.session() as session:
        version = session.get(ModelVersion, model_version_id)
        path, classes = workspace.absolute(version.path), list(version.classes)
        items = dataset_items(session, dataset_version_id=dataset_version_id)
    eval_items = [item for item in items if item.role == ROLE_EVAL]
    rejected_items = [item for item in items if item.rejected]
    to_predict = {item.image_id: item for item in [*eval_items, *rejected_items]}

    model, _ = load_detector(path, device)
    predictions: dict[int, dict[str, Any]] = {}
    ids = list(to_predict)
    for start in range(0, len(ids), 64):
        if should_stop is not None and should_stop():
            raise JobCancelled("evaluation cancelled")
        chunk = ids[start : start + 64]
        paths = [str(workspace.absolute(to_predict[i].path)) for i in chunk]
        for prediction in predict_detections(
            model, paths, image_ids=chunk, batch_size=batch_size, score_threshold=0.05
        ):
            predictions[prediction["image_id"]] = prediction

    metrics = evaluate_predictions(
        eval_items, rejected_items, predictions, classes, score_threshold=score_threshold
    )
    metrics["dataset_version_id"] = dataset_version_id
    with workspace.transaction() as session:
        session.get(ModelVersion, model_version_id).metrics = metrics
    return metrics


def evaluation_stage(ctx: StageContext) -> dict[str, Any]:
    """Evaluate this job's teacher and student (or, without them, the newest ones)."""
    models = {}
    for kind in ("teacher", "student"):
        if kind in ctx.results:
            models[kind] = ctx.results[kind]["model_version_id"]
        elif kind not in ctx.options.stages:
            latest = latest_model(ctx.workspace, kind)
            if latest is not None:
                models[kind] = latest.id
    if not models:
        raise RuntimeError("no detector to evaluate: add the teacher or student stage")

    metrics: dict[str, Any] = {}
    for position, (kind, version_id) in enumerate(models.items()):
        ctx.report(fraction=position / len(models), force=True)
        ctx.check_cancel()
        result = evaluate_model(
            ctx.workspace,
            version_id,
            ctx.results["dataset_version_id"],
            score_threshold=ctx.options.score_threshold,
            device=ctx.options.device,
            should_stop=ctx.should_stop,
        )
        summary = {k: v for k, v in result.items() if k != "pr_curves"}
        metrics[kind] = {"model_version_id": version_id, **summary}
        log.info(
            "%s (model %d): AP50 %s, AP %s", kind, version_id, result.get("AP50"), result.get("AP")
        )
    return {"metrics": metrics}


STAGE_FUNCTIONS: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "classifier": classifier_stage,
    "proposals": proposals_stage,
    "teacher": teacher_stage,
    "student": student_stage,
    "evaluation": evaluation_stage,
}
