"""Distilling a detector, measured on real data: teacher, student, student + KD, student + CWD.

    .venv/bin/python -m bench.distill            # full run, under an hour on 2 CPU cores
    .venv/bin/python -m bench.distill --quick    # a smoke test of the whole path (minutes)

On ../shared/data/fire-boxes (608x608 CCTV frames, YOLO boxes, classes fire and smoke), whole
clips are held out (the name before `_mp4-`, or blocks of 100 image numbers for `img_<n>_...`
frames; about 20 % of the images). For each seed, on the training clips:

    teacher       tiny-teacher (ResNet-10 layout, widths 32-256, FPN 64, 1.6 M parameters)
    student       tiny-student (widths 8-64, FPN 32, 0.15 M parameters), detection loss only
    student + KD  plus binary logit KD (Hinton et al. 2015, temperature tau) at every location
                  of every pyramid level, from that seed's teacher
    student + CWD plus channel-wise distillation (Shu et al. 2021) of each FPN level (through a
                  1x1 adaptor, 32 -> 64 channels) and of each level's class logits

All runs use the same split, image size, optimiser and augmentation (flip and zoom); the
teacher trains three times as many epochs as the students, as a teacher is trained once, ahead
of its students (with the students' 12 epochs the 1.6 M-parameter teacher was no better than the
0.15 M-parameter student: mean AP50 0.272 against 0.280 over three seeds, no gap to close). The
seed changes initialisation, sample order and augmentation. Models are scored after their last
epoch (no checkpoint selection on the held-out clips) with COCO AP and AP50 (pycocotools,
core.metrics) at the original 608 px. Gap closed = (CWD - student) / (teacher - student), from
the means, and per seed.

Runs go two at a time in separate processes with one thread each (two cores); a seed's
distilled students start once its teacher is trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.detection_data import load_yolo_samples, split_by_clip  # noqa: E402
from core.distill import DistillConfig  # noqa: E402
from core.train_detector import DetectorTrainConfig, evaluate_detector, train_detector  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fire-boxes"
METHODS = ("teacher", "student", "student + KD", "student + CWD")


@dataclass
class BenchSettings:
    data: str = str(DEFAULT_DATA)
    out: str = "bench-distill"
    seeds: tuple[int, ...] = (0, 1, 2)
    image_size: int = 192
    epochs: int = 12
    teacher_epochs: int = 36
    batch_size: int = 8
    lr: float = 0.002
    holdout: float = 0.2
    workers: int = 2
    train_limit: int | None = None
    test_limit: int | None = None
    cwd_tau: float = 1.0
    cwd_feature_weight: float = 2.0
    cwd_logit_weight: float = 2.0
    kd_tau: float = 2.0
    kd_weight: float = 2.0


def _run_config(settings: BenchSettings, method: str, seed: int, teacher: str | None):
    distill = DistillConfig()
    if method == "student + KD":
        distill = DistillConfig(
            kind="kd", teacher=teacher, kd_tau=settings.kd_tau, logit_weight=settings.kd_weight
        )
    elif method == "student + CWD":
        distill = DistillConfig(
            kind="cwd",
            teacher=teacher,
            tau=settings.cwd_tau,
            feature_weight=settings.cwd_feature_weight,
            logit_weight=settings.cwd_logit_weight,
        )
    return DetectorTrainConfig(
        variant="tiny-teacher" if method == "teacher" else "tiny-student",
        epochs=settings.teacher_epochs if method == "teacher" else settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        optimizer="adamw",
        weight_decay=0.05,
        warmup_steps=30,
        image_size=settings.image_size,
        seed=seed,
        device="cpu",
        eval_every=10**6,  # only the last epoch, and only for the log: see _one_run
        distill=distill,
    )


def _split(settings: BenchSettings):
    samples, class_names = load_yolo_samples(settings.data)
    train, test = split_by_clip(samples, settings.holdout, seed=0)
    return train[: settings.train_limit], test[: settings.test_limit], class_names


def _one_run(settings: BenchSettings, method: str, seed: int, teacher: str | None) -> dict:
    """Train one model in this process (one thread) and score it on the held-out clips."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    train, test, class_names = _split(settings)
    slug = method.replace(" + ", "_").lower()
    checkpoint = Path(settings.out) / f"{slug}_seed{seed}.pt"
    started = time.monotonic()
    result = train_detector(
        _run_config(settings, method, seed, teacher), train, class_names, checkpoint_path=checkpoint
    )
    train_seconds = time.monotonic() - started
    metrics = evaluate_detector(result.model, test, class_names, batch_size=settings.batch_size)
    return {
        "method": method,
        "seed": seed,
        "AP": metrics["AP"],
        "AP50": metrics["AP50"],
        "per_class": metrics["per_class"],
        "train_seconds": train_seconds,
        "checkpoint": str(checkpoint),
    }


def _run_all(settings: BenchSettings) -> list[dict]:
    """Every run, two at a time: teachers and plain students first; a seed's distilled
    students start as soon as that seed's teacher is written."""
    results = []
    with ProcessPoolExecutor(settings.workers, mp_context=get_context("spawn")) as pool:
        pending = {
            pool.submit(_one_run, settings, method, seed, None)
            for method in ("teacher", "student")
            for seed in settings.seeds
        }
        while pending:
            done = next(as_completed(pending))
            pending.remove(done)
            record = done.result()
            results.append(record)
            print(
                f"  {record['method']:<14} seed {record['seed']}: AP50 {record['AP50']:.3f} "
                f"AP {record['AP']:.3f} ({record['train_seconds'] / 60:.1f} min training)",
                flush=True,
            )
            if record["method"] == "teacher":
                for method in ("student + CWD", "student + KD"):
                    pending.add(
                        pool.submit(
                            _one_run, settings, method, record["seed"], record["checkpoint"]
                        )
                    )
    return results


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(results: list[dict], seeds: tuple[int, ...]) -> str:
    """The markdown table and the gap each distillation closes."""
    by = {(r["method"], r["seed"]): r for r in results}
    lines = [
        "| model | AP50 (mean ± std) | AP (mean ± std) | AP50 per seed | train min / run |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        runs = [by[(method, seed)] for seed in seeds]
        per_seed = ", ".join(f"{r['AP50']:.3f}" for r in runs)
        minutes = statistics.mean(r["train_seconds"] for r in runs) / 60
        lines.append(
            f"| {method} | {_mean_std([r['AP50'] for r in runs])} | "
            f"{_mean_std([r['AP'] for r in runs])} | {per_seed} | {minutes:.1f} |"
        )

    def mean(method: str, metric: str) -> float:
        return statistics.mean(by[(method, seed)][metric] for seed in seeds)

    lines.append("")
    for metric in ("AP50", "AP"):
        teacher, student = mean("teacher", metric), mean("student", metric)
        gap = teacher - student
        for method in ("student + KD", "student + CWD"):
            gains = [by[(method, s)][metric] - by[("student", s)][metric] for s in seeds]
            per_seed_gaps = [
                g / (by[("teacher", s)][metric] - by[("student", s)][metric])
                if by[("teacher", s)][metric] != by[("student", s)][metric]
                else float("nan")
                for g, s in zip(gains, seeds, strict=True)
            ]
            if gap <= 0:
                # Without a better teacher there is no gap to close; a share would be noise.
                lines.append(
                    f"- {method}, {metric}: the teacher is not better than the student "
                    f"({gap:+.3f}), so no gap to close; gain per seed "
                    + ", ".join(f"{g:+.3f}" for g in gains)
                )
                continue
            closed = (mean(method, metric) - student) / gap
            lines.append(
                f"- {method}, {metric}: closes {closed:.0%} of the teacher-student gap "
                f"({gap:+.3f}); gain per seed "
                + ", ".join(f"{g:+.3f}" for g in gains)
                + "; gap closed per seed "
                + ", ".join(f"{p:.0%}" for p in per_seed_gaps)
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=BenchSettings.data)
    parser.add_argument("--out", default=BenchSettings.out, help="checkpoints go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(BenchSettings.seeds))
    parser.add_argument("--image-size", type=int, default=BenchSettings.image_size)
    parser.add_argument("--epochs", type=int, default=BenchSettings.epochs, help="students")
    parser.add_argument("--teacher-epochs", type=int, default=BenchSettings.teacher_epochs)
    parser.add_argument("--workers", type=int, default=BenchSettings.workers)
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 2 epochs, 128 px, 96 train / 48 test images"
    )
    args = parser.parse_args(argv)

    settings = BenchSettings(
        data=args.data,
        out=args.out,
        seeds=tuple(args.seeds),
        image_size=args.image_size,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        workers=args.workers,
    )
    if args.quick:
        settings.seeds, settings.epochs, settings.image_size = (0,), 2, 128
        settings.teacher_epochs = 2
        settings.train_limit, settings.test_limit = 96, 48
    if not Path(settings.data, "classes.txt").is_file():
        print(f"no fire-boxes data at {settings.data}; pass --data DIR", file=sys.stderr)
        return 2
    Path(settings.out).mkdir(parents=True, exist_ok=True)

    train, test, _ = _split(settings)
    print(
        f"fire-boxes: {len(train)} training images, {len(test)} held-out images "
        f"({sum(len(s[1]) == 0 for s in test)} without boxes); {len(settings.seeds)} seeds, "
        f"{settings.epochs} epochs ({settings.teacher_epochs} for teachers) at "
        f"{settings.image_size} px, {settings.workers} workers",
        flush=True,
    )
    started = time.monotonic()

    results = _run_all(settings)

    minutes = (time.monotonic() - started) / 60
    print()
    print(summarise(results, settings.seeds))
    print()
    print(f"Total time: {minutes:.1f} min with {settings.workers} worker processes, 1 thread each.")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"settings": asdict(settings), "runs": results, "minutes": minutes}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
