"""Training the RS+EPM network on image-level tags (and reviewer points).

Schedule (our choice; the paper's authors released no training code):

1. warm-up, epochs [0, warmup_epochs): classification only (BCE on the tags). CAMs of a network
   that cannot yet classify are noise, so no seed is drawn from them.
2. seeds from CAM, epochs [warmup_epochs, recursion_start_epoch): each batch's CAMs are
   normalised, refined through the features' self-correlation (RecurSeed) and thresholded
   into a pseudo mask with an ignored band; the segmentation head learns it (CE).
3. recursion, epochs [recursion_start_epoch, epochs): the seeds also take the segmentation
   head's own foreground probabilities (weight `seg_seed_weight`), so the masks it learns
   feed the next round's seeds; the CAM branch learns the same pseudo mask pixel by pixel.

Reviewer points are foreground disks in every pseudo mask from stage 2 on, for classes the tags
say are present. Negative images (no class present) are background everywhere.

Distillation (config.teacher): a trained classifier of the same classes, frozen, sees the same
batch; the student adds binary KD on the class logits ("kd_logits") and channel-wise
distillation of the raw CAMs ("cwd_cam", core.distill) to its own losses, in every stage.

Checkpoints are dictionaries (model, optimizer, scheduler, config, epoch, step, best_metric,
classes, arch, history) written to `<output_dir>/last.pt` after every epoch and on an
interrupt; `resume=True` continues from the exact batch where the run stopped.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from core.classifier_data import ClassifierDataset, ClassifierSample
from core.device import pick_device, seed_everything
from core.distill import classifier_distillation
from core.distributed import any_rank, init_distributed, make_sampler
from core.rsepm import (
    ARCHS,
    IGNORE_INDEX,
    RSEPMNet,
    build_rsepm,
    cam_pixel_loss,
    classification_loss,
    load_rsepm,
    segmentation_loss,
)
from core.seeds import (
    CONFIDENT_BG,
    CONFIDENT_FG,
    FIRST_ORDER_THRESHOLD,
    SECOND_ORDER_THRESHOLD,
    SEED_BG_THRESHOLD,
    SEED_FG_THRESHOLD,
    normalize_max,
    pseudo_mask,
    refine_seeds,
    self_correlation,
)

log = logging.getLogger(__name__)


@dataclass
class ClassifierConfig:
    """Everything a training run depends on; defaults fit resnet10 at 224 px on a 2-core CPU."""

    arch: str = "resnet10"
    weights: str | None = None  # None random (warns), "torchvision", or a .pth path
    seg_channels: int | None = None  # None: 64 for small backbones, 256 for resnet50
    image_size: int = 224
    epochs: int = 22
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    backbone_lr_scale: float = 1.0  # e.g. 0.1 with pretrained weights
    lr_warmup_steps: int = 100
    warmup_epochs: int = 6
    recursion_start_epoch: int = 12
    seg_seed_weight: float = 0.5  # share of the segmentation head in the recursive seeds
    cls_weight: float = 1.0
    seg_weight: float = 1.0
    cam_weight: float = 0.5
    first_order_threshold: float = FIRST_ORDER_THRESHOLD
    second_order_threshold: float = SECOND_ORDER_THRESHOLD
    seed_fg_threshold: float = SEED_FG_THRESHOLD
    seed_bg_threshold: float = SEED_BG_THRESHOLD
    confident_fg: float = CONFIDENT_FG
    confident_bg: float = CONFIDENT_BG
    point_radius_frac: float = 0.04
    scale_range: tuple[float, float] = (1.0, 1.4)
    binary: bool = False  # the caller collapsed the classes (core.classifier_data.to_binary)
    # Distillation from a trained classifier (a larger backbone, say) into this one: binary KD
    # (Hinton et al. 2015) on the class logits and CWD (Shu et al. 2021) on the raw CAMs, so an
    # edge classifier learns where the teacher looks as well as what it says.
    teacher: str | None = None  # a checkpoint written by train_classifier, same classes
    kd_weight: float = 1.0
    kd_tau: float = 2.0
    cam_distill_weight: float = 1.0
    cam_tau: float = 1.0
    num_workers: int = 2
    seed: int = 0
    device: str | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.arch not in ARCHS and self.arch != "mobilenet_v3_large":
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.image_size % 16:
            raise ValueError(
                f"image_size must be a multiple of 16 (output stride), got {self.image_size}"
            )
        if not 0 <= self.warmup_epochs <= self.recursion_start_epoch:
            raise ValueError("need 0 <= warmup_epochs <= recursion_start_epoch")
        if self.kd_tau <= 0 or self.cam_tau <= 0:
            raise ValueError("distillation temperatures kd_tau and cam_tau must be positive")
        self.scale_range = tuple(self.scale_range)


@dataclass(frozen=True)
class StepInfo:
    epoch: int  # 0-based
    step: int  # 0-based batch index within the epoch
    steps_per_epoch: int
    losses: dict[str, float]  # per term, unweighted, plus "total" (weighted sum)
    lr: float


@dataclass(frozen=True)
class EpochInfo:
    epoch: int  # 0-based
    epochs: int
    losses: dict[str, float]  # means over the epoch's batches
    metric: float  # what best_metric tracks: mean total loss (lower is better)
    seconds: float
    stage: str  # "warm-up", "cam seeds" or "recursion"


class TrainCallback:
    """Hooks a caller overrides to show progress or stop early; all are no-ops here.

    Called on the main process only (rank 0 under torchrun).
    """

    def on_step(self, info: StepInfo) -> None:
        pass

    def on_epoch_end(self, info: EpochInfo) -> None:
        pass

    def should_stop(self) -> bool:
        """True to stop after the current batch, saving a checkpoint (like Ctrl-C)."""
        return False


@dataclass
class TrainResult:
    model: RSEPMNet  # unwrapped, on the training device, in eval mode
    checkpoint_path: Path
    epochs_completed: int
    interrupted: bool
    best_metric: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the term."""

    def __init__(self, term: str, epoch: int, step: int):
        super().__init__(
            f"non-finite {term} loss at epoch {epoch + 1}, step {step + 1}; lower --lr or check "
            "the input images"
        )
        self.term = term


class _StopRequested(Exception):
    pass


def stage_of(epoch: int, config: ClassifierConfig) -> str:
    if epoch < config.warmup_epochs:
        return "warm-up"
    if epoch < config.recursion_start_epoch:
        return "cam seeds"
    return "recursion"


# ----------------------------------------------------------------------------------------------
# One batch.


def make_pseudo_masks(
    cams: torch.Tensor,
    seg_logits: torch.Tensor,
    features: Sequence[torch.Tensor],
    tags: torch.Tensor,
    point_seeds: torch.Tensor,
    config: ClassifierConfig,
    recursive: bool,
) -> torch.Tensor:
    """RecurSeed's pseudo masks for a batch (no gradient flows through them).

    Args:
        cams: (N, C, h, w) raw CAMs; seg_logits: (N, C+1, H4, W4); features: stride-16 maps
            for the self-correlation; tags: (N, C) 1 present, 0 absent, -1 unknown;
            point_seeds: (N, C, S, S) uint8.
        recursive: mix the segmentation head's foreground into the seeds (stage 3).

    Returns:
        (N, H4, W4) long pseudo mask: 0 background, 1..C classes, 255 ignored.
    """
    with torch.no_grad():
        present = (tags > 0.5).float()
        seeds = normalize_max(cams) * present[:, :, None, None]
        if recursive and config.seg_seed_weight > 0:
            seg_fg = torch.softmax(seg_logits, dim=1)[:, 1:]
            seg_fg = F.adaptive_avg_pool2d(seg_fg, cams.shape[2:])
            seg_seeds = normalize_max(seg_fg) * present[:, :, None, None]
            weight = config.seg_seed_weight
            seeds = (1 - weight) * seeds + weight * seg_seeds
        correlation = self_correlation(
            features, config.first_order_threshold, config.second_order_threshold
        )
        refined = refine_seeds(
            correlation, seeds, present, config.seed_fg_threshold, config.seed_bg_threshold
        )
        size = seg_logits.shape[2:]
        refined = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)
        points = F.adaptive_max_pool2d(point_seeds.float(), size)
        mask = pseudo_mask(refined, present, points, config.confident_fg, config.confident_bg)
        # An image with no class present but some unknown is not a negative: nothing is certain.
        unsure = (present.sum(dim=1) == 0) & (tags < 0).any(dim=1)
        mask[unsure] = IGNORE_INDEX
        return mask


def training_losses(
    model: torch.nn.Module,
    batch: dict,
    epoch: int,
    config: ClassifierConfig,
    teacher: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Unweighted loss terms of one batch: "cls" always, "seg" after warm-up, "cam" in the
    recursion stage; with a teacher also "kd_logits" and "cwd_cam" (core.distill)."""
    stage = stage_of(epoch, config)
    with_seg = stage != "warm-up"
    out = model(batch["image"], with_seg=with_seg, with_features=with_seg)
    losses = {"cls": classification_loss(out.logits, batch["tags"])}
    if teacher is not None:
        with torch.no_grad():
            taught = teacher(batch["image"], with_seg=False, with_features=False)
        with_cams = config.cam_distill_weight > 0
        losses.update(
            classifier_distillation(
                out.logits,
                taught.logits,
                out.cams if with_cams else None,
                taught.cams if with_cams else None,
                kd_tau=config.kd_tau,
                cam_tau=config.cam_tau,
            )
        )
    if not with_seg:
        return losses
    recursive = stage == "recursion"
    mask = make_pseudo_masks(
        out.cams.detach(),
        out.seg_logits.detach(),
        [f.detach() for f in out.features],
        batch["tags"],
        batch["point_seeds"],
        config,
        recursive,
    )
    losses["seg"] = segmentation_loss(out.seg_logits, mask)
    if recursive and config.cam_weight > 0:
        losses["cam"] = cam_pixel_loss(out.cams, mask)
    return losses


# ----------------------------------------------------------------------------------------------
# The loop.


def _lr_lambda(config: ClassifierConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.lr_warmup_steps:
            return (step + 1) / config.lr_warmup_steps
        progress = (step - config.lr_warmup_steps) / max(1, total_steps - config.lr_warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _load_teacher(
    config: ClassifierConfig, classes: Sequence[str], device: torch.device
) -> torch.nn.Module | None:
    """The frozen teacher of a distilled run, or None."""
    if config.teacher is None:
        return None
    path = Path(config.teacher)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {path} does not exist; train the teacher first "
            "(pyrolabel train classifier --arch resnet50) and pass its checkpoint"
        )
    teacher, meta = load_rsepm(path, device)
    if list(meta["classes"]) != list(classes):
        raise ValueError(
            f"teacher {path} predicts {meta['classes']}, the student {list(classes)}; "
            "distil between classifiers of the same classes (and the same --binary)"
        )
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    log.info("distilling from teacher %s (%s)", path, meta["arch"])
    return teacher.eval()


def train_classifier(
    config: ClassifierConfig,
    samples: Sequence[ClassifierSample],
    classes: Sequence[str],
    output_dir: str | Path,
    *,
    resume: bool = False,
    callback: TrainCallback | None = None,
) -> TrainResult:
    """Train (or resume training) the RS+EPM network.

    Args:
        config: the run's settings; on resume the checkpoint's config is used instead, except
            for `epochs`, `num_workers` and `device`, which may change.
        samples: the training images with their tags (len(tags) == len(classes)) and points.
        classes: class names, in tag order.
        output_dir: where `last.pt` (and `best.pt`) go.
        resume: continue from `output_dir/last.pt`.
        callback: progress hooks, see TrainCallback.

    Returns:
        TrainResult. Ctrl-C (KeyboardInterrupt) or callback.should_stop() saves a checkpoint and
        returns with interrupted=True.

    Raises:
        NonFiniteLossError: a loss term became NaN or infinite (the message names it).
        FileNotFoundError: resume without a checkpoint.
    """
    callback = callback or TrainCallback()
    output_dir = Path(output_dir)
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    if not samples:
        raise ValueError("no training samples: tag some images of the training split first")

    # Resuming: the checkpoint's config wins, so the run continues as it started.
    checkpoint = None
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(
                f"no checkpoint to resume at {last_path}; train without --resume"
            )
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
        saved = dict(checkpoint["config"])
        for key in ("epochs", "num_workers", "device"):
            saved[key] = getattr(config, key)
        config = ClassifierConfig(**saved)
        if list(checkpoint["classes"]) != list(classes):
            raise ValueError(
                f"checkpoint classes {checkpoint['classes']} differ from {list(classes)}; "
                "train a new model instead of resuming"
            )

    device = pick_device(config.device)
    dist_info = init_distributed(device)
    rank, world_size = dist_info.rank, dist_info.world_size
    seed_everything(config.seed + rank)

    # Model, optimiser, schedule.
    model = build_rsepm(
        config.arch,
        len(classes),
        weights=None if checkpoint else config.weights,
        seg_channels=config.seg_channels,
        from_checkpoint=checkpoint is not None,
    ).to(device)
    teacher = _load_teacher(config, classes, device)
    head_ids = {id(p) for p in model.head_parameters()}
    backbone_params = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": config.lr * config.backbone_lr_scale},
            {"params": model.head_parameters(), "lr": config.lr},
        ],
        weight_decay=config.weight_decay,
    )
    dataset = ClassifierDataset(
        samples,
        len(classes),
        config.image_size,
        augment=True,
        scale_range=config.scale_range,
        point_radius_frac=config.point_radius_frac,
        seed=config.seed,
    )
    batches_per_epoch = math.ceil(len(dataset) / world_size / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(config, batches_per_epoch * config.epochs)
    )
    start_epoch, start_step, best_metric, history = 0, 0, math.inf, []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint.get("step", 0)
        best_metric, history = checkpoint["best_metric"], list(checkpoint.get("history", []))
        log.info("resuming %s at epoch %d, step %d", last_path, start_epoch + 1, start_step)

    train_model: torch.nn.Module = model
    if world_size > 1:
        # The segmentation head sits idle during warm-up, hence find_unused_parameters.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    def save(epoch: int, step: int) -> None:
        if rank != 0:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": asdict(config),
            "epoch": epoch,  # epochs fully done
            "step": step,  # batches done in the epoch after those
            "best_metric": best_metric,
            "classes": list(classes),
            "arch": config.arch,
            "history": history,
        }
        tmp = last_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(last_path)  # an interrupt mid-write never leaves a broken last.pt

    # Train.
    started = time.monotonic()
    interrupted = False
    epoch, batches_done = start_epoch, start_step
    try:
        for epoch in range(start_epoch, config.epochs):
            epoch_started = time.monotonic()
            dataset.set_epoch(epoch)
            # The same sampler with one process or many, so the order of a given (seed, epoch)
            # is fixed and a resumed run can skip exactly the batches already done.
            sampler = make_sampler(dataset, dist_info, shuffle=True, seed=config.seed)
            sampler.set_epoch(epoch)
            order = list(sampler)
            skip = start_step if epoch == start_epoch else 0
            batches_done = skip
            loader = DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=order[skip * config.batch_size :],
                num_workers=config.num_workers,
                persistent_workers=False,
                drop_last=False,
            )
            train_model.train()
            sums: dict[str, float] = {}
            count = 0
            for step, batch in enumerate(loader, start=skip):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                losses = training_losses(train_model, batch, epoch, config, teacher)
                weights = {
                    "cls": config.cls_weight,
                    "seg": config.seg_weight,
                    "cam": config.cam_weight,
                    "kd_logits": config.kd_weight,
                    "cwd_cam": config.cam_distill_weight,
                }
                for term, value in losses.items():
                    if not torch.isfinite(value):
                        raise NonFiniteLossError(term, epoch, step)
                total = sum(weights[term] * value for term, value in losses.items())

                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                scheduler.step()
                batches_done += 1

                values = {term: float(value.detach()) for term, value in losses.items()}
                values["total"] = float(total.detach())
                for term, value in values.items():
                    sums[term] = sums.get(term, 0.0) + value
                count += 1
                if rank == 0:
                    lr = optimizer.param_groups[-1]["lr"]
                    callback.on_step(StepInfo(epoch, step, batches_per_epoch, values, lr))
                    if step % config.log_every == 0:
                        terms = " ".join(f"{k}={v:.4f}" for k, v in values.items())
                        log.debug("epoch %d step %d %s", epoch + 1, step + 1, terms)
                if any_rank(rank == 0 and callback.should_stop(), dist_info, device):
                    raise _StopRequested

            # End of epoch: bookkeeping, checkpoint.
            means = {term: value / max(1, count) for term, value in sums.items()}
            metric = means.get("total", math.inf)
            record = {"epoch": epoch + 1, "stage": stage_of(epoch, config), **means}
            history.append(record)
            improved = metric < best_metric
            best_metric = min(best_metric, metric)
            save(epoch + 1, 0)
            if improved and rank == 0:
                shutil.copyfile(last_path, best_path)
            if rank == 0:
                callback.on_epoch_end(
                    EpochInfo(
                        epoch,
                        config.epochs,
                        means,
                        metric,
                        time.monotonic() - epoch_started,
                        stage_of(epoch, config),
                    )
                )
    except (KeyboardInterrupt, _StopRequested):
        # A batch in flight when Ctrl-C came is lost; `batches_done` are in the weights.
        interrupted = True
        save(epoch, batches_done)
        log.warning("interrupted at epoch %d; checkpoint saved to %s", epoch + 1, last_path)

    model.eval()
    done = epoch if interrupted else config.epochs
    return TrainResult(
        model=model,
        checkpoint_path=last_path,
        epochs_completed=done,
        interrupted=interrupted,
        best_metric=best_metric,
        history=history,
        seconds=time.monotonic() - started,
    )


def save_for_inference(checkpoint_path: Path, out: Path) -> None:
    """Write a training checkpoint's network alone, in half precision, for shipping.

    Optimizer and scheduler state go and floating-point weights become float16: about a quarter
    of the training checkpoint's size. `core.rsepm.load_rsepm` reads it like any checkpoint.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    slim = {k: v for k, v in checkpoint.items() if k not in ("optimizer", "scheduler")}
    slim["model"] = {
        k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, out)


class TqdmProgress(TrainCallback):
    """A tqdm bar per epoch showing the per-term losses; for the command line."""

    def __init__(self, **tqdm_kwargs):
        self._bar = None
        self._kwargs = tqdm_kwargs

    def on_step(self, info: StepInfo) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(
                total=info.steps_per_epoch,
                initial=info.step,
                desc=f"epoch {info.epoch + 1}",
                leave=False,
                **self._kwargs,
            )
        self._bar.update(1)
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in info.losses.items()})

    def on_epoch_end(self, info: EpochInfo) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
