"""Factories for the retrain tests: a workspace with a small curated set, and fake stages.

The curated set: 96x72 generated images, a red square ("fire") or grey square ("smoke") on a
dark background, as rows a review would leave: accepted pseudo boxes and a human box on the
train split, a reviewer-rejected false positive (reason "lamp") and a "nothing here" image, and
a val split with reference boxes and a fire-free image.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from db.models import Box, BoxOrigin, BoxStatus, Image, LabelClass, Tag, TagOrigin

SIZE = (96, 72)
FIRE_COLOUR = (230, 40, 20)
SMOKE_COLOUR = (150, 150, 150)


def _write(path: Path, squares: list[tuple[tuple[int, int, int], tuple[int, ...]]], seed: int):
    rng = np.random.default_rng(seed)
    width, height = SIZE
    pixels = rng.integers(0, 50, (height, width, 3), dtype=np.uint8)
    for colour, (x1, y1, x2, y2) in squares:
        pixels[y1:y2, x1:x2] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(pixels).save(path)
    return path


def make_curated_workspace(workspace, image_dir: Path) -> dict[str, int]:
    """Fill `workspace` (classes fire, smoke) with the curated set above; returns image ids by
    name."""
    plan = {
        # name: (split, [(class, box, origin, status, reason)], reviewer says nothing here)
        "train_fire_1": ("train", [(0, (10, 10, 40, 40), "pseudo", "accepted", None)], False),
        "train_fire_2": ("train", [(0, (50, 20, 86, 60), "pseudo", "accepted", None)], False),
        "train_smoke_1": ("train", [(1, (20, 30, 70, 66), "human", "accepted", None)], False),
        "train_both": (
            "train",
            [
                (0, (5, 5, 30, 30), "pseudo", "accepted", None),
                (1, (50, 30, 90, 70), "given", "accepted", None),
            ],
            False,
        ),
        "train_lamp": ("train", [(0, (30, 20, 60, 50), "pseudo", "rejected", "lamp")], False),
        "train_empty": ("train", [], True),
        "val_fire": ("val", [(0, (20, 15, 55, 50), "reference", "pending", None)], False),
        "val_smoke": ("val", [(1, (40, 10, 80, 50), "reference", "pending", None)], False),
        "val_clean": ("val", [], False),
    }
    ids = {}
    with workspace.transaction() as session:
        class_ids = dict(session.execute(select(LabelClass.index, LabelClass.id)).all())
        for seed, (name, (split, boxes, nothing_here)) in enumerate(plan.items()):
            squares = [
                (FIRE_COLOUR if cls == 0 else SMOKE_COLOUR, box)
                for cls, box, _, status, _ in boxes
                if status != "rejected"
            ]
            path = _write(image_dir / f"{name}.png", squares, seed)
            image = Image(
                path=str(path),
                content_hash=f"{seed:064x}",
                width=SIZE[0],
                height=SIZE[1],
                split=split,
            )
            session.add(image)
            session.flush()
            ids[name] = image.id
            for cls, (x1, y1, x2, y2), origin, status, reason in boxes:
                session.add(
                    Box(
                        image_id=image.id,
                        class_id=class_ids[cls],
                        x1=x1,
                        y1=y1,
                        x2=x2,
                        y2=y2,
                        origin=BoxOrigin(origin),
                        status=BoxStatus(status),
                        false_positive_reason=reason,
                    )
                )
            tag_origin = None
            if nothing_here:
                tag_origin = TagOrigin.REVIEWER
            elif name == "val_clean":
                tag_origin = TagOrigin.REFERENCE
            if tag_origin is not None:
                for class_id in class_ids.values():
                    session.add(
                        Tag(image_id=image.id, class_id=class_id, present=False, origin=tag_origin)
                    )
    return ids


# ----------------------------------------------------------------------------------------------
# Worker processes.


def tracked_workers(monkeypatch):
    """Body of a `workers` fixture: yields the worker processes a test starts (fake stages
    importable, one thread each) and kills those still running at the end."""
    from app import jobs

    started = []

    original = jobs.start_worker

    def start(workspace, job_id):
        process = original(workspace, job_id)
        started.append(process)
        return process

    monkeypatch.setattr(jobs, "start_worker", start)
    # Workers find the fake stages (retrain_fixtures) next to this file.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    # One thread each: on a shared 2-core machine more only fight over the cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


# ----------------------------------------------------------------------------------------------
# Fake stages, for runner tests that need no training. The worker loads them by reference:
# PYROLABEL_STAGE_FUNCTIONS=retrain_fixtures:FAKE_STAGES with this folder on PYTHONPATH.


def _steps(ctx, count: int, pause: float) -> dict:
    for step in range(1, count + 1):
        ctx.report(fraction=step / count, epoch=1, step=step, losses={"total": 1.0 / step})
        ctx.check_cancel()
        time.sleep(pause)
    return {"steps": count}


def fake_teacher(ctx) -> dict:
    return _steps(ctx, 3, 0.01)


def fake_student(ctx) -> dict:
    return _steps(ctx, 3, 0.01)


def fake_evaluation(ctx) -> dict:
    return {"metrics": {"student": {"AP50": 0.5}}}


def slow_teacher(ctx) -> dict:
    """Runs for minutes unless cancelled; marks on disk that it started."""
    (ctx.work_dir).mkdir(parents=True, exist_ok=True)
    (ctx.work_dir / "teacher-started").write_text("1")
    return _steps(ctx, 3000, 0.05)


FAKE_STAGES = {"teacher": fake_teacher, "student": fake_student, "evaluation": fake_evaluation}
SLOW_STAGES = {**FAKE_STAGES, "teacher": slow_teacher}
