from sqlalchemy import select

from db.models import LabelClass


def test_workspace_has_classes(workspace):
    with workspace.session() as session:
        names = list(session.scalars(select(LabelClass.name).order_by(LabelClass.index)))
    assert names == ["fire", "smoke"]
