"""The demo workspace behind `make demo`: 40 fire and smoke frames from assets/demo, proposed.

    python -m app.demo --workspace workspace/demo          build (or reuse) the demo workspace

Building ingests the demo images with their boxes kept as reference labels (the classifier sees
only the tags, as a team with tags only would), registers the classifier shipped in
assets/demo/classifier.pt (or, when it is missing, trains a small one here in a few minutes),
and runs `propose`, so the review app opens on real proposals. Every step is a `pyrolabel`
command, and a step already done is skipped, so running it again is quick.

The shipped classifier is the network whose pseudo labels the README's table measures: trained
by core.train_classifier (what `pyrolabel train classifier` runs) on the tags of ../shared/data
with some clips held out, and saved in half precision:

    python -m bench.pseudo_labels --save-network assets/demo/classifier.pt
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from sqlalchemy import func, select

from app.cli import main as pyrolabel
from db.models import Image, ModelVersion, ProposalImage
from db.proposals import add_model_version
from db.workspace import Workspace

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_MODEL = ASSETS / "classifier.pt"

MODEL_ARCH = "resnet10"
# Without the shipped file: a short run on the 40 demo images only (a weak model, but real).
FALLBACK_EPOCHS = 6
FALLBACK_IMAGE_SIZE = 128


def _run(workspace: Workspace, *argv: str) -> None:
    code = pyrolabel(["--workspace", str(workspace.root), *argv])
    if code != 0:
        raise SystemExit(f"demo: `pyrolabel {' '.join(argv)}` failed with exit code {code}")


def build(workspace: Workspace, assets: Path = ASSETS) -> None:
    """Create the demo workspace from `assets`, or finish one a previous call left half done."""
    _run(workspace, "init", "--classes", "fire,smoke")
    with workspace.session() as session:
        image_count = session.scalar(select(func.count(Image.id)))
    if image_count == 0:
        _run(
            workspace,
            "ingest",
            str(assets / "images"),
            "--yolo",
            str(assets / "labels"),
            "--classes",
            str(assets / "classes.txt"),
            "--tags-only",
        )

    with workspace.session() as session:
        has_classifier = session.scalar(
            select(ModelVersion.id).where(ModelVersion.kind == "classifier").limit(1)
        )
    if not has_classifier:
        model = assets / DEMO_MODEL.name
        if model.is_file():
            register_classifier(workspace, model)
        else:
            log.warning(
                "%s is missing; training a small classifier on the demo images instead", model
            )
            _run(
                workspace,
                "train",
                "classifier",
                "--arch",
                MODEL_ARCH,
                "--epochs",
                str(FALLBACK_EPOCHS),
                "--image-size",
                str(FALLBACK_IMAGE_SIZE),
                "--weights",
                "none",
                "--workers",
                "0",
            )

    with workspace.session() as session:
        proposed = session.scalar(select(func.count(ProposalImage.id)))
    if proposed < image_count or image_count == 0:
        _run(workspace, "propose", "--workers", "0")


def register_classifier(workspace: Workspace, checkpoint_path: Path) -> int:
    """Copy a classifier checkpoint into the workspace and register it as a model version."""
    import torch

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    classes = checkpoint["classes"]
    if classes != workspace.classes():
        raise SystemExit(
            f"{checkpoint_path} was trained for classes {classes}, the workspace has "
            f"{workspace.classes()}; remake it with "
            "`python -m bench.pseudo_labels --save-network assets/demo/classifier.pt`"
        )
    target = workspace.models_dir / "demo-classifier.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint_path, target)
    with workspace.transaction() as session:
        return add_model_version(
            session,
            kind="classifier",
            arch=checkpoint["arch"],
            path=workspace.relative(target),
            classes=classes,
            config=checkpoint.get("config"),
            metrics={"source": "assets/demo/classifier.pt"},
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", default="workspace/demo", help="demo workspace folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    workspace = Workspace(args.workspace)
    build(workspace)
    print(f"demo workspace ready at {workspace.root}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
