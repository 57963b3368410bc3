"""`pyrolabel train <target>`: train a model from the workspace.

Targets are sub-subcommands, each a (add_arguments, run) pair in TARGETS; today only
`classifier` (the RS+EPM network that makes CAMs and masks for `propose`).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from core.classifier_data import BINARY_CLASS, ClassifierSample, to_binary
from core.distributed import init_distributed
from core.rsepm import ARCHS
from core.train_classifier import (
    ClassifierConfig,
    EpochInfo,
    NonFiniteLossError,
    TqdmProgress,
    train_classifier,
)
from db.proposals import add_model_version, registered_model_paths, training_images
from db.workspace import Workspace

CLASSIFIER_KIND = "classifier"
_RUN_DIR = re.compile(r"^classifier-(\d+)$")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a model on the workspace's labels")
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, (add_arguments, run_target, help_text) in TARGETS.items():
        sub = targets.add_parser(name, help=help_text)
        add_arguments(sub)
        sub.set_defaults(_train_target=run_target)
    return parser


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    return args._train_target(args, workspace)


# ----------------------------------------------------------------------------------------------
# train classifier


def _add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ClassifierConfig()
    parser.add_argument(
        "--arch", choices=ARCHS, default=defaults.arch, help="backbone (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument(
        "--image-size",
        type=int,
        default=defaults.image_size,
        help="square training size, a multiple of 16",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument(
        "--weights",
        default="torchvision",
        help="backbone weights: torchvision (falls back to random init with a warning when "
        "they are not in the torch cache), none, or a .pth file",
    )
    parser.add_argument(
        "--binary", action="store_true", help=f"one class, '{BINARY_CLASS}': any class present"
    )
    parser.add_argument(
        "--split",
        action="append",
        help="split(s) to train on; repeat for several (default: train)",
    )
    parser.add_argument(
        "--warmup-epochs", type=int, help="classification-only epochs before seeds start"
    )
    parser.add_argument(
        "--recursion-epoch", type=int, help="epoch from which seeds use the segmentation head"
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.num_workers, help="data loader processes"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when there is one)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest interrupted classifier run in models/",
    )
    parser.add_argument(
        "--teacher",
        metavar="MODEL_ID|FILE",
        help="distil from this trained classifier (a model version id or a checkpoint): KD on "
        "its logits and CWD on its CAMs, e.g. a mobilenet_v3 student of a resnet50 teacher",
    )
    parser.add_argument(
        "--kd-weight", type=float, default=defaults.kd_weight, help="with --teacher"
    )
    parser.add_argument(
        "--cam-distill-weight",
        type=float,
        default=defaults.cam_distill_weight,
        help="with --teacher; 0 distils the logits only",
    )


def _schedule(args: argparse.Namespace, epochs: int) -> tuple[int, int]:
    """Warm-up and recursion start scaled to the epoch count, as in the 22-epoch default."""
    defaults = ClassifierConfig()
    warmup = args.warmup_epochs
    if warmup is None:
        warmup = round(epochs * defaults.warmup_epochs / defaults.epochs)
    recursion = args.recursion_epoch
    if recursion is None:
        recursion = max(warmup, round(epochs * defaults.recursion_start_epoch / defaults.epochs))
    return warmup, recursion


def _next_run_dir(models_dir: Path) -> Path:
    numbers = [
        int(m.group(1)) for p in models_dir.glob("classifier-*") if (m := _RUN_DIR.match(p.name))
    ]
    return models_dir / f"classifier-{max(numbers, default=0) + 1:03d}"


def _resumable_run_dir(workspace: Workspace, registered: set[str]) -> Path | None:
    """The newest classifier run with a checkpoint that no model version points at."""
    runs = sorted(
        (p for p in workspace.models_dir.glob("classifier-*") if _RUN_DIR.match(p.name)),
        key=lambda p: int(_RUN_DIR.match(p.name).group(1)),
        reverse=True,
    )
    for run_dir in runs:
        if (run_dir / "last.pt").is_file() and workspace.relative(
            run_dir / "last.pt"
        ) not in registered:
            return run_dir
    return None


class _EpochPrinter(TqdmProgress):
    """The tqdm bar of each epoch, then one line per epoch with its per-term losses."""

    def on_epoch_end(self, info: EpochInfo) -> None:
        super().on_epoch_end(info)
        terms = " ".join(f"{k}={v:.4f}" for k, v in info.losses.items())
        tqdm.write(
            f"epoch {info.epoch + 1}/{info.epochs} [{info.stage}] {terms} ({info.seconds:.0f} s)"
        )


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _teacher_path(workspace: Workspace, teacher: str) -> Path | None:
    """--teacher as a checkpoint path (a classifier's model version id, or a file); None when
    the id names no classifier."""
    if not teacher.isdigit():
        return Path(teacher)
    from db.models import ModelVersion

    with workspace.session() as session:
        version = session.get(ModelVersion, int(teacher))
        if version is None or version.kind != CLASSIFIER_KIND:
            return None
        return workspace.absolute(version.path)


def _run_classifier(args: argparse.Namespace, workspace: Workspace) -> int:
    splits = args.split or ["train"]

    # Training samples from the database: tags (given, reviewer), trusted boxes, points.
    with workspace.session() as session:
        classes = workspace.classes(session)
        images = training_images(session, splits=splits)
        registered = registered_model_paths(session, kind=CLASSIFIER_KIND)
    samples = []
    for image in images:
        tags = tuple(
            -1.0 if name not in image.tags else float(image.tags[name]) for name in classes
        )
        points = tuple((classes.index(name), x, y) for name, x, y in image.points)
        samples.append(ClassifierSample(str(workspace.absolute(image.path)), tags, points))
    if args.binary:
        samples, classes = to_binary(samples), [BINARY_CLASS]
    if not samples:
        print(
            f"error: no tagged image in split(s) {', '.join(splits)}; ingest tags "
            "(pyrolabel ingest DIR --tags CSV) or pass --split",
            file=sys.stderr,
        )
        return 1
    missing = [s.path for s in samples if not Path(s.path).is_file()]
    if missing:
        print(
            f"error: {len(missing)} training image(s) not found, e.g. {missing[0]}; "
            "re-ingest the moved folder",
            file=sys.stderr,
        )
        return 1

    # Where the checkpoint goes: a new run folder, or the interrupted one with --resume.
    if args.resume:
        run_dir = _resumable_run_dir(workspace, registered)
        if run_dir is None:
            print(
                "error: no interrupted classifier run to resume; train without --resume",
                file=sys.stderr,
            )
            return 1
    else:
        run_dir = _next_run_dir(workspace.models_dir)
    warmup, recursion = _schedule(args, args.epochs)
    weights = None if args.weights in ("none", "random", "") else args.weights
    teacher = _teacher_path(workspace, args.teacher) if args.teacher else None
    if args.teacher and (teacher is None or not teacher.is_file()):
        print(
            f"error: --teacher {args.teacher}: no such classifier checkpoint; pass a "
            "classifier's model version id (the Models page lists them) or a checkpoint file",
            file=sys.stderr,
        )
        return 1
    config = ClassifierConfig(
        arch=args.arch,
        weights=weights,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=warmup,
        recursion_start_epoch=recursion,
        binary=args.binary,
        teacher=str(teacher) if teacher is not None else None,
        kd_weight=args.kd_weight,
        cam_distill_weight=args.cam_distill_weight,
        num_workers=args.workers,
        seed=args.seed,
        device=args.device,
    )
    present = sum(1 for s in samples if any(t > 0.5 for t in s.tags))
    with_points = sum(1 for s in samples if s.points)
    print(
        f"training {config.arch} classifier on {len(samples)} images of split(s) "
        f"{', '.join(splits)} ({present} with a class present, {with_points} with points); "
        f"classes: {', '.join(classes)}; checkpoints in {workspace.relative(run_dir)}"
    )

    # Train.
    progress = _EpochPrinter()
    try:
        result = train_classifier(
            config, samples, classes, run_dir, resume=args.resume, callback=progress
        )
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    if result.interrupted:
        print(
            f"interrupted in epoch {result.epochs_completed + 1}; checkpoint saved to "
            f"{workspace.relative(result.checkpoint_path)}; run `pyrolabel train classifier "
            "--resume` to continue",
            file=sys.stderr,
        )
        return 130

    # Register the model version: once, from rank 0, when torchrun started several processes.
    if not init_distributed().is_main:
        return 0
    final = result.history[-1] if result.history else {}
    losses = {k: v for k, v in final.items() if k not in ("epoch", "stage")}
    metrics = {
        "final_losses": losses,
        "best_metric": result.best_metric,
        "train_seconds": result.seconds,
        "samples": len(samples),
        "splits": splits,
        "history": result.history,
    }
    with workspace.transaction() as session:
        model_id = add_model_version(
            session,
            kind=CLASSIFIER_KIND,
            arch=config.arch,
            path=workspace.relative(result.checkpoint_path),
            classes=classes,
            config=asdict(config),
            metrics=metrics,
        )
    terms = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
    print(
        f"trained classifier {model_id} ({config.arch}) on {len(samples)} images, "
        f"{result.epochs_completed} epochs in {_format_duration(result.seconds)}; final {terms}; "
        f"checkpoint {workspace.relative(result.checkpoint_path)}"
    )
    return 0


TARGETS = {
    CLASSIFIER_KIND: (
        _add_classifier_arguments,
        _run_classifier,
        "the RS+EPM network (classifier, CAM and masks) on image tags and points",
    ),
}
