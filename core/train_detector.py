"""Training, resuming, evaluating and loading FCOS detectors, with optional distillation from a
teacher checkpoint.

    config = DetectorTrainConfig(variant="tiny-teacher", epochs=10)
    result = train_detector(config, train_samples, class_names, val_samples=held_out,
                            checkpoint_path="models/teacher.pt")
    student = DetectorTrainConfig(variant="tiny-student",
                                  distill=DistillConfig(kind="cwd", teacher="models/teacher.pt"))

Samples are (image path, boxes (N, 4) x1y1x2y2 original pixels, labels (N,)); see
core.detection_data. Under `torchrun` the same call trains with DistributedDataParallel: each
process takes its share of every epoch (`batch_size` is per process), rank 0 alone reports
progress, evaluates and writes checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from core.detection_data import DetectionDataset, DetectionSample, collate, make_sample
from core.detectors import (
    build_detector,
    build_detector_for_checkpoint,
    detector_forward,
    fpn_channels,
    image_size_of,
    teacher_outputs,
)
from core.device import pick_device, seed_everything
from core.distill import DetectorDistillLoss, DistillConfig
from core.distributed import DistInfo, init_distributed, make_sampler, unwrap, wrap_model
from core.images import read_header

log = logging.getLogger(__name__)


@dataclass
class DetectorTrainConfig:
    """Everything that decides a detector training run; stored in every checkpoint.

    batch_size is per process. lr follows a linear warm-up over `warmup_steps` and a cosine
    decay to zero over the run. `optimizer` is "sgd" (with `momentum`) or "adamw".
    """

    variant: str = "tiny-student"
    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 10.0
    image_size: int | None = None
    seed: int = 0
    device: str | None = None
    weights: str | None = None
    augment: bool = True
    hflip: float = 0.5
    scale_range: tuple[float, float] = (0.75, 1.25)
    num_workers: int = 0
    eval_every: int = 1
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if isinstance(self.distill, dict):
            self.distill = DistillConfig(**self.distill)
        self.scale_range = tuple(self.scale_range)
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, not {self.optimizer!r}")
        if self.distill.kind != "none" and not self.distill.teacher:
            raise ValueError(f"distill kind {self.distill.kind} needs a teacher checkpoint path")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetectorTrainConfig:
        return cls(**values)


@dataclass
class TrainProgress:
    """What a progress callback receives after every optimisation step and every evaluation.

    epoch is 1-based; step counts steps within the epoch (1..steps_per_epoch); losses holds
    each loss term's value at this step (detection terms and every distillation term, plus
    "total"); metrics holds the latest evaluation ({"AP", "AP50", ...}) or is empty.
    """

    stage: str
    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    losses: dict[str, float]
    eta_seconds: float | None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Share of the run done, in [0, 1]."""
        done = (self.epoch - 1) * self.steps_per_epoch + self.step
        return min(1.0, done / max(1, self.epochs * self.steps_per_epoch))


@dataclass
class TrainResult:
    model: nn.Module
    checkpoint_path: Path | None
    best_checkpoint_path: Path | None
    epochs_done: int
    best_metric: float | None
    cancelled: bool
    history: list[dict[str, Any]]


class _StudentStep(nn.Module):
    """Student plus distillation adaptors as one module, so DistributedDataParallel syncs the
    adaptors' gradients too. The frozen teacher is kept out of the module tree (in a tuple):
    DDP must neither broadcast nor reduce it."""

    def __init__(
        self, student: nn.Module, distill: DetectorDistillLoss | None, teacher: nn.Module | None
    ) -> None:
        super().__init__()
        self.student = student
        self.distill = distill
        self._teacher = (teacher,)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        out = detector_forward(self.student, images, targets)
        losses = dict(out.losses)
        teacher = self._teacher[0]
        if self.distill is not None and teacher is not None:
            teacher_features, teacher_logits = teacher_outputs(teacher, out.batch)
            losses.update(
                self.distill(out.features, out.cls_logits, teacher_features, teacher_logits)
            )
        return losses


def load_detector(path: str | Path, device: str | torch.device | None = None):
    """Rebuild a detector from a checkpoint written by train_detector.

    Returns:
        (model in eval mode on `device`, the checkpoint dict). The dict holds "model",
        "optimizer", "scheduler", "config", "epoch", "step", "best_metric", "class_names",
        "variant", "num_classes", "image_size", "backbone_norm", "history".
    """
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = build_detector_for_checkpoint(
        checkpoint["variant"],
        checkpoint["num_classes"],
        image_size=checkpoint["image_size"],
        backbone_norm=checkpoint["backbone_norm"],
    )
    model.load_state_dict(checkpoint["model"])
    model.to(device if isinstance(device, torch.device) else pick_device(device)).eval()
    return model, checkpoint


def train_detector(
    config: DetectorTrainConfig,
    train_samples: Sequence[DetectionSample],
    class_names: Sequence[str],
    *,
    val_samples: Sequence[DetectionSample] | None = None,
    checkpoint_path: str | Path | None = None,
    resume_from: str | Path | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    stage: str = "detector",
) -> TrainResult:
    """Train (or resume training) one detector.

    Args:
        config: the run's settings; with config.distill.kind "kd" or "cwd", the teacher
            checkpoint is loaded and frozen, and its distillation terms join the loss.
        train_samples: (path, boxes (N, 4) x1y1x2y2 original pixels, labels (N,)); N = 0 for
            hard negatives.
        class_names: name per class index; len() is the number of classes.
        val_samples: evaluated with COCO AP after every `eval_every` epochs (on rank 0); the
            best AP50 is kept in `<checkpoint>.best.pt`.
        checkpoint_path: written after every epoch and on cancel (rank 0 only).
        resume_from: a checkpoint of this run; training goes on from its epoch and step with
            its optimizer and scheduler state. Its config replaces `config`'s, except device.
        progress: called on rank 0 after every step and evaluation.
        should_cancel: called once per step; True stops all ranks after the step, writes the
            checkpoint and returns with cancelled=True.
        stage: the name progress reports carry (e.g. "teacher", "student").

    Raises:
        FloatingPointError: a loss term became NaN or infinite; the message names it.
    """
    # Setting up: resume state, device, process group.
    checkpoint = None
    if resume_from is not None:
        checkpoint = torch.load(Path(resume_from), map_location="cpu", weights_only=True)
        config = DetectorTrainConfig.from_dict({**checkpoint["config"], "device": config.device})
    device = pick_device(config.device)
    info = init_distributed(device)
    seed_everything(config.seed)
    num_classes = len(class_names)

    # Creating the models.
    if checkpoint is not None:
        student = build_detector_for_checkpoint(
            config.variant,
            num_classes,
            image_size=checkpoint["image_size"],
            backbone_norm=checkpoint["backbone_norm"],
        )
    else:
        student = build_detector(
            config.variant, num_classes, weights=config.weights, image_size=config.image_size
        )
    image_size = image_size_of(student)
    teacher, distill = None, None
    if config.distill.kind != "none":
        teacher, teacher_checkpoint = load_detector(config.distill.teacher, device)
        if teacher_checkpoint["num_classes"] != num_classes:
            raise ValueError(
                f"teacher {config.distill.teacher} has {teacher_checkpoint['num_classes']} "
                f"classes, the student {num_classes}; train both on the same class list"
            )
        if teacher_checkpoint["image_size"] != image_size:
            log.warning(
                "teacher trained at %d px, student at %d px: the teacher sees the student's "
                "images, at a scale it was not trained on",
                teacher_checkpoint["image_size"],
                image_size,
            )
        teacher.requires_grad_(False)
        distill = DetectorDistillLoss(config.distill, fpn_channels(student), fpn_channels(teacher))
    step_module = _StudentStep(student, distill, teacher).to(device)
    parameters = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = _make_optimizer(config, parameters)

    # Loading data.
    dataset = DetectionDataset(
        train_samples,
        image_size,
        augment=config.augment,
        hflip=config.hflip,
        scale_range=config.scale_range,
        seed=config.seed,
    )
    if len(dataset) == 0:
        raise ValueError("no training samples; the curated set is empty")
    sampler = make_sampler(dataset, info, shuffle=True, seed=config.seed)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_schedule(config.warmup_steps, total_steps)
    )

    start_epoch, start_step, best_metric, history = 0, 0, None, []
    if checkpoint is not None:
        student.load_state_dict(checkpoint["model"])
        if distill is not None and checkpoint.get("distill"):
            distill.load_state_dict(checkpoint["distill"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint.get("step", 0)
        best_metric, history = checkpoint.get("best_metric"), checkpoint.get("history", [])
        log.info("resuming %s at epoch %d step %d", resume_from, start_epoch + 1, start_step)
    model = wrap_model(step_module, info, device)

    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    best_path = checkpoint_path.with_suffix(".best.pt") if checkpoint_path else None

    def save(epoch: int, step: int, path: Path | None = checkpoint_path) -> None:
        if path is None or not info.is_main:
            return
        state = {
            "model": student.state_dict(),
            "distill": distill.state_dict() if distill is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": asdict(config),
            "epoch": epoch,
            "step": step,
            "best_metric": best_metric,
            "class_names": list(class_names),
            "variant": config.variant,
            "num_classes": num_classes,
            "image_size": image_size,
            "backbone_norm": student.backbone_norm,
            "history": history,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)

    # Start training.
    started, steps_done = time.monotonic(), 0
    remaining_steps = total_steps - (start_epoch * steps_per_epoch + start_step)
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        order = list(sampler)
        batches = [
            order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)
        ]
        first_step = start_step if epoch == start_epoch else 0
        loader = DataLoader(
            dataset,
            batch_sampler=batches[first_step:],
            collate_fn=collate,
            num_workers=config.num_workers,
        )
        model.train()
        epoch_started, sums = time.monotonic(), {}
        for step, (images, targets, _) in enumerate(loader, start=first_step + 1):
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses = model(images, targets)

            # One all-reduce per step carries both flags, so every rank stops at the same step.
            bad_term = _first_non_finite(losses)
            cancel = bool(should_cancel()) if should_cancel is not None else False
            bad_anywhere, cancel = _any_rank_flags([bad_term is not None, cancel], info, device)
            if bad_anywhere:
                where = f"term {bad_term!r}" if bad_term else "a term on another rank"
                value = float(losses[bad_term].detach()) if bad_term else float("nan")
                raise FloatingPointError(
                    f"{stage}: non-finite loss in {where} ({value}) at epoch {epoch + 1} step "
                    f"{step}; lower the learning rate or check the boxes of this batch"
                )
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            scheduler.step()

            values = {name: float(value.detach()) for name, value in losses.items()}
            values["total"] = float(total.detach())
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
            steps_done += 1
            per_step = (time.monotonic() - started) / steps_done
            eta = per_step * (remaining_steps - steps_done)
            if info.is_main and progress is not None:
                progress(
                    TrainProgress(
                        stage, epoch + 1, config.epochs, step, steps_per_epoch, values, eta, metrics
                    )
                )
            if cancel:
                save(epoch, step)
                log.info("%s cancelled at epoch %d step %d", stage, epoch + 1, step)
                return _result(
                    student, checkpoint_path, best_path, epoch, best_metric, True, history
                )

        # End of epoch: evaluate on rank 0, keep the best, write the checkpoint.
        record = {
            "epoch": epoch + 1,
            "seconds": time.monotonic() - epoch_started,
            "losses": {name: value / max(1, len(loader)) for name, value in sums.items()},
        }
        is_eval_epoch = (epoch + 1) % max(1, config.eval_every) == 0 or epoch + 1 == config.epochs
        improved = False
        if val_samples and info.is_main and is_eval_epoch:
            metrics = evaluate_detector(
                student, val_samples, class_names, batch_size=config.batch_size, device=device
            )
            record["metrics"] = metrics
            log.info(
                "%s epoch %d: AP50 %.4f AP %.4f", stage, epoch + 1, metrics["AP50"], metrics["AP"]
            )
            improved = best_metric is None or metrics["AP50"] > best_metric
            best_metric = metrics["AP50"] if improved else best_metric
            if progress is not None:
                eta = per_step * (remaining_steps - steps_done) if steps_done else None
                progress(
                    TrainProgress(
                        stage,
                        epoch + 1,
                        config.epochs,
                        steps_per_epoch,
                        steps_per_epoch,
                        record["losses"],
                        eta,
                        metrics,
                    )
                )
        history.append(record)
        if improved:
            save(epoch + 1, 0, best_path)
        save(epoch + 1, 0)
        student.train()

    return _result(student, checkpoint_path, best_path, config.epochs, best_metric, False, history)


def _lr_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up from 0.1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.1 + 0.9 * step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _make_optimizer(config: DetectorTrainConfig, parameters: list[Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def _first_non_finite(losses: dict[str, Tensor]) -> str | None:
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            return name
    return None


def _any_rank_flags(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    if not info.enabled:
        return flags
    import torch.distributed as dist

    tensor = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value > 0) for value in tensor.tolist()]


def _result(
    student: nn.Module,
    checkpoint_path: Path | None,
    best_path: Path | None,
    epochs: int,
    best_metric: float | None,
    cancelled: bool,
    history: list[dict[str, Any]],
) -> TrainResult:
    student.eval()
    return TrainResult(
        model=student,
        checkpoint_path=checkpoint_path,
        best_checkpoint_path=best_path if best_path and best_path.exists() else None,
        epochs_done=epochs,
        best_metric=best_metric,
        cancelled=cancelled,
        history=history,
    )


# ---------------------------------------------------------------------------------------------
# Prediction and evaluation


@torch.no_grad()
def predict_detections(
    model: nn.Module,
    images: Sequence[str | Path | DetectionSample],
    *,
    image_ids: Sequence | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    score_threshold: float = 0.05,
) -> list[dict[str, Any]]:
    """Run a detector over image files.

    Args:
        model: an FCOS from build_detector / load_detector (any mode; it is put in eval mode).
        images: image paths, or samples (their boxes are ignored).
        image_ids: one id per image for the output; defaults to the path string.

    Returns:
        One {"image_id", "boxes": [(x1, y1, x2, y2)] in pixels of the original image,
        "labels": [int], "scores": [float]} per image, as core.metrics.coco_box_ap expects.
    """
    model = unwrap(model)
    device = device if isinstance(device, torch.device) else next(model.parameters()).device
    samples = [
        make_sample(item, [], []) if isinstance(item, str | Path) else make_sample(*item)
        for item in images
    ]
    ids = list(image_ids) if image_ids is not None else [s[0] for s in samples]
    dataset = DetectionDataset(samples, image_size_of(model), augment=False, cache=False)
    was_training = model.training
    model.eval()
    predictions = []
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        batch = [dataset[i][0].to(device) for i in indices]
        for index, output in zip(indices, model(batch), strict=True):
            keep = output["scores"] >= score_threshold
            boxes = output["boxes"][keep].cpu() / dataset.scale(index)
            predictions.append(
                {
                    "image_id": ids[index],
                    "boxes": [tuple(box) for box in boxes.tolist()],
                    "labels": output["labels"][keep].cpu().tolist(),
                    "scores": output["scores"][keep].cpu().tolist(),
                }
            )
    model.train(was_training)
    return predictions


def ground_truth(
    samples: Sequence[DetectionSample], image_ids: Sequence | None = None
) -> list[dict[str, Any]]:
    """Samples as core.metrics.coco_box_ap's ground truth: {"image_id", "width", "height",
    "boxes": [(x1, y1, x2, y2)] original pixels, "labels"}; image ids default to paths."""
    ids = list(image_ids) if image_ids is not None else [str(s[0]) for s in samples]
    records = []
    for image_id, sample in zip(ids, samples, strict=True):
        path, boxes, labels = make_sample(*sample)
        header = read_header(path)
        records.append(
            {
                "image_id": image_id,
                "width": header.width,
                "height": header.height,
                "boxes": [tuple(box) for box in boxes.tolist()],
                "labels": labels.tolist(),
            }
        )
    return records


def evaluate_detector(
    model: nn.Module,
    samples: Sequence[DetectionSample],
    class_names: Sequence[str],
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """COCO box AP and AP50 (overall and per class) of `model` on `samples`.

    Returns core.metrics.coco_box_ap's dict {"AP", "AP50", "per_class"}.
    """
    from core.metrics import coco_box_ap

    predictions = predict_detections(model, samples, batch_size=batch_size, device=device)
    return coco_box_ap(ground_truth(samples), predictions, list(class_names))


__all__ = [
    "DetectorTrainConfig",
    "TrainProgress",
    "TrainResult",
    "evaluate_detector",
    "ground_truth",
    "load_detector",
    "predict_detections",
    "train_detector",
]
