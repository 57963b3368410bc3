"""The README's main command builds its workspace from assets/demo: real images, the shipped
classifier, real proposals (`make demo` then serves it)."""

import pytest
from sqlalchemy import func, select

from app import demo
from db.models import Box, BoxOrigin, BoxStatus, Image, ModelVersion, ProposalImage
from db.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.skipif(not demo.DEMO_MODEL.is_file(), reason="assets/demo/classifier.pt is missing")
def test_demo_workspace_has_real_proposals_and_is_reused(tmp_path):
    workspace = Workspace(tmp_path / "demo")
    demo.build(workspace)

    def counts():
        with workspace.session() as session:
            images = session.scalar(select(func.count(Image.id)))
            classifiers = session.scalar(
                select(func.count(ModelVersion.id)).where(ModelVersion.kind == "classifier")
            )
            proposed = session.scalar(select(func.count(ProposalImage.id)))
            pseudo = session.scalar(
                select(func.count(Box.id)).where(
                    Box.origin == BoxOrigin.PSEUDO, Box.status == BoxStatus.PENDING
                )
            )
            reference = session.scalar(
                select(func.count(Box.id)).where(Box.origin == BoxOrigin.REFERENCE)
            )
        return images, classifiers, proposed, pseudo, reference

    images, classifiers, proposed, pseudo, reference = counts()
    labelled = sum(1 for p in (demo.ASSETS / "labels").glob("*.txt") if p.read_text().strip())
    assert (images, classifiers, proposed) == (40, 1, 40)
    # The boxes are references only (the classifier saw tags); every labelled frame has some.
    assert reference >= labelled > 0
    # The shipped classifier proposes about three boxes a frame here (124 when it was shipped);
    # at least one a frame on average says it is a trained network, not noise gated to nothing.
    assert pseudo >= 40
    mask_pngs = list(workspace.masks_dir.rglob("*.png"))
    assert len(mask_pngs) == 40 * 2  # one probability map per image and class

    # A second run reuses everything.
    demo.build(workspace)
    assert counts() == (images, classifiers, proposed, pseudo, reference)
