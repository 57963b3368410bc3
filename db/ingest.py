"""Register image folders and their annotations in a workspace (`pyrolabel ingest`).

The steps, each one pass:

1. Scan: find image files (recursive), read each header (displayed size, EXIF-aware), decode
   the pixels once at reduced scale to catch truncated files, and hash the bytes, in a thread
   pool (Pillow and hashlib release the GIL).
2. Register: an image is known by its content hash, so a second ingest adds nothing and a
   moved file gets its new path. New images are inserted in bulk, a chunk per commit, so an
   interrupted ingest resumes where it stopped.
3. Labels: every annotation source is parsed by core.formats, matched to the scanned images
   (relative path first, then a unique file stem), clipped to the image, and inserted in bulk.
   Rows that exist already (same image, class, origin and coordinates) are not added again.

Every problem becomes one line `path: reason`, kept in the report and written to
runs/ingest-<UTC time>.log as it happens; the rest of the batch goes on.

Origins. Boxes are BoxOrigin.GIVEN with status accepted (a team's own boxes, trained on), or
BoxOrigin.REFERENCE with `tags_only` (scored against, never trained on); masks likewise. Tags,
whether read from a CSV or derived from boxes or masks, are TagOrigin.GIVEN either way:
`tags_only` exists precisely so that training sees tags while the boxes stay held out.
Ingest writes no review events: it records data, not a reviewer's decision.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session
from tqdm import tqdm

from core.formats import (
    ImageKeyIndex,
    ImageLabels,
    Problem,
    clip_labels,
    key_of,
    read_classes_file,
    read_coco,
    read_masks_dir,
    read_tags_csv,
    read_voc_dir,
    read_yolo_dir,
    yolo_labels,
)
from core.images import DEFAULT_MAX_PIXELS, ImageError, content_hash, is_image_file, read_header
from db.models import Box, BoxOrigin, BoxStatus, Image, Mask, MaskOrigin, Tag, TagOrigin
from db.queries import chunked, class_ids
from db.workspace import Workspace, WorkspaceError

log = logging.getLogger(__name__)

INGEST_USER = "ingest"
# Two boxes of one image, class and origin closer than this (pixels, every corner) are the
# same box: YOLO's six decimals round a 608 px frame to 0.0006 px.
SAME_BOX_PX = 0.01


@dataclass
class IngestOptions:
    """What to ingest besides the images, and how. Paths may be None."""

    tags_csv: Path | None = None
    yolo_dir: Path | None = None
    classes_file: Path | None = None  # YOLO class names; default: classes.txt beside yolo_dir
    coco_json: Path | None = None
    voc_dir: Path | None = None
    masks_dir: Path | None = None
    mask_class: str | None = None  # default: the workspace's first class
    split: str = "train"
    tags_only: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Decode every image once (at 1/8 scale for JPEG) so truncated files are refused here
    # instead of failing a training run hours later; costs ~0.6 ms per 608x608 JPEG.
    verify_pixels: bool = True
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    progress: bool = True


@dataclass
class IngestReport:
    """Counts of one ingest; `problems` holds one `path: reason` line per problem."""

    found: int = 0  # image files found
    new_images: int = 0
    known_images: int = 0  # already in the workspace (same content)
    moved: int = 0  # known images whose file moved; their path was updated
    duplicates: int = 0  # files with the same content as another file of this ingest
    skipped: int = 0  # bad image files
    tags: int = 0
    boxes: int = 0
    masks: int = 0
    problems: list[str] = field(default_factory=list)
    log_path: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per step

    @property
    def usable(self) -> bool:
        """Something usable was found: at least one good image file."""
        return self.found - self.skipped > 0

    def summary(self) -> str:
        known = f"{self.known_images} already known"
        if self.moved:
            known += f" ({self.moved} moved)"
        extras = [known]
        if self.duplicates:
            extras.append(f"{self.duplicates} duplicate files")
        text = (
            f"ingested {self.new_images}, skipped {self.skipped} "
            f"({', '.join(extras)}); added {self.tags} tags, {self.boxes} boxes, "
            f"{self.masks} masks; {len(self.problems)} problems"
        )
        if self.problems and self.log_path is not None:
            text += f" (listed in {self.log_path})"
        return text


@dataclass(frozen=True)
class _Scanned:
    """A good image file: key (relative path, no suffix), displayed size, content hash."""

    path: Path
    key: str
    width: int
    height: int
    content_hash: str


@dataclass
class _Registered:
    id: int
    width: int
    height: int
    path: Path


class _ProblemLog:
    """Collects problem lines and appends each to the run's log file at once."""

    def __init__(self, report: IngestReport, handle: IO[str] | None):
        self.report, self.handle = report, handle

    def add(self, problem: Problem | ImageError | str) -> None:
        line = str(problem)
        self.report.problems.append(line)
        log.debug("problem: %s", line)
        if self.handle is not None:
            self.handle.write(line + "\n")
            self.handle.flush()

    def extend(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            self.add(problem)


def ingest(
    workspace: Workspace,
    images_dir: str | Path,
    options: IngestOptions | None = None,
    *,
    write_log: bool = True,
) -> IngestReport:
    """Ingest the images under `images_dir` and the annotation sources named in `options`.

    Returns:
        The report; it never raises for bad files (they become problem lines), only for
        unusable arguments (WorkspaceError naming the fix).
    """
    options = options or IngestOptions()
    # Resolved once, so every path found under it is absolute without a resolve() per file
    # (a third of a millisecond each on a busy disk: half a minute per 100 000 images).
    images_dir = Path(images_dir).resolve()
    if not images_dir.is_dir():
        raise WorkspaceError(f"{images_dir} is not a folder of images")
    classes = workspace.classes()
    mask_class = options.mask_class or classes[0]
    if options.masks_dir is not None and mask_class not in classes:
        raise WorkspaceError(
            f"--mask-class {mask_class!r} is not a workspace class ({', '.join(classes)})"
        )
    classes_file = _classes_file(options)
    file_classes = _read_class_names(classes_file) if classes_file is not None else []

    report = IngestReport()
    handle = None
    if write_log:
        workspace.runs_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        report.log_path = workspace.runs_dir / f"ingest-{stamp}.log"
        handle = report.log_path.open("w", encoding="utf-8")
    problems = _ProblemLog(report, handle)
    try:
        # 1. Scan
        started = time.perf_counter()
        scanned, bad_keys = _scan(images_dir, workspace, options, report, problems)
        report.seconds["scan"] = time.perf_counter() - started

        # 2. Register
        started = time.perf_counter()
        by_key = _register(workspace, images_dir, scanned, options, report, problems)
        report.seconds["register"] = time.perf_counter() - started

        # 3. Labels
        started = time.perf_counter()
        sources = _read_sources(options, classes, classes_file, file_classes, mask_class, problems)
        if sources:
            _ingest_labels(workspace, by_key, bad_keys, sources, classes, options, report, problems)
        report.seconds["labels"] = time.perf_counter() - started
        if handle is not None:
            handle.write(report.summary() + "\n")
    finally:
        if handle is not None:
            handle.close()
    log.debug(report.summary())
    return report


def _classes_file(options: IngestOptions) -> Path | None:
    if options.yolo_dir is None:
        return None
    if options.classes_file is not None:
        if not Path(options.classes_file).is_file():
            raise WorkspaceError(f"classes file {options.classes_file} does not exist")
        return Path(options.classes_file)
    for candidate in (options.yolo_dir / "classes.txt", options.yolo_dir.parent / "classes.txt"):
        if candidate.is_file():
            return candidate
    raise WorkspaceError(
        f"--yolo {options.yolo_dir} needs --classes FILE (class names, one per line, in id order)"
    )


def _read_class_names(classes_file: Path) -> list[str]:
    """The YOLO class names, read before anything is ingested: without them no box has a class."""
    try:
        names = read_classes_file(classes_file)
    except (OSError, UnicodeDecodeError) as error:
        raise WorkspaceError(
            f"classes file {classes_file} cannot be read ({error}); it should be UTF-8 text "
            "with one class name per line, in id order"
        ) from error
    if not names:
        raise WorkspaceError(
            f"classes file {classes_file} names no class; write one class name per line, in id "
            "order (0 fire, 1 smoke: `fire` then `smoke`)"
        )
    return names


# 1. Scan


def _scan(
    images_dir: Path,
    workspace: Workspace,
    options: IngestOptions,
    report: IngestReport,
    problems: _ProblemLog,
) -> tuple[list[_Scanned], list[str]]:
    """The good image files, and the keys of the bad ones (each reported here)."""
    paths = _image_files(images_dir, skip=workspace.root)
    report.found = len(paths)

    def scan_one(path: Path) -> _Scanned | ImageError:
        try:
            header = read_header(path, options.max_pixels, verify=options.verify_pixels)
            digest = content_hash(path)
        except ImageError as err:
            return err
        except OSError as err:
            return ImageError(path, f"cannot read ({err.strerror or err})")
        return _Scanned(path, key_of(path, images_dir), header.width, header.height, digest)

    scanned, bad_keys = [], []
    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
        results = pool.map(scan_one, paths)
        for result in tqdm(
            results, total=len(paths), desc="scan", unit="img", disable=not options.progress
        ):
            if isinstance(result, ImageError):
                report.skipped += 1
                problems.add(f"{result.path}: {result.reason}; skipped")
                bad_keys.append(key_of(result.path, images_dir))
            else:
                scanned.append(result)
    return scanned, bad_keys


def _image_files(root: Path, *, skip: Path) -> list[Path]:
    """Image files under root, sorted; hidden folders and the workspace itself are left out."""
    found = []
    skip = skip.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip
        )
        found.extend(here / name for name in sorted(filenames) if is_image_file(name))
    return found


# 2. Register


def _stored_path(workspace: Workspace, path: Path) -> str:
    """Workspace.relative for a path that is already absolute and resolved."""
    try:
        return path.relative_to(workspace.root).as_posix()
    except ValueError:
        return str(path)


def _register(
    workspace: Workspace,
    images_dir: Path,
    scanned: list[_Scanned],
    options: IngestOptions,
    report: IngestReport,
    problems: _ProblemLog,
) -> dict[str, _Registered]:
    """Insert new images, update moved ones; returns {key: registered image} for every scan."""
    first_by_hash: dict[str, _Scanned] = {}
    for item in scanned:
        if item.content_hash in first_by_hash:
            report.duplicates += 1
            problems.add(
                f"{item.path}: same content as {first_by_hash[item.content_hash].path}; "
                "one image, labels of both files apply to it"
            )
        else:
            first_by_hash[item.content_hash] = item

    source = workspace.relative(images_dir)
    registered: dict[str, _Registered] = {}
    other_split = 0
    for batch in chunked(list(first_by_hash.values())):
        with workspace.transaction() as session:
            hashes = [item.content_hash for item in batch]
            existing = {
                row.content_hash: row
                for row in session.execute(
                    select(
                        Image.id,
                        Image.content_hash,
                        Image.path,
                        Image.split,
                        Image.width,
                        Image.height,
                    ).where(Image.content_hash.in_(hashes))
                )
            }
            new_rows = []
            for item in batch:
                path = _stored_path(workspace, item.path)
                row = existing.get(item.content_hash)
                if row is None:
                    new_rows.append(
                        {
                            "path": path,
                            "content_hash": item.content_hash,
                            "width": item.width,
                            "height": item.height,
                            "split": options.split,
                            "source": source,
                        }
                    )
                    continue
                report.known_images += 1
                if row.split != options.split:
                    other_split += 1
                if row.path != path:
                    if workspace.absolute(row.path).exists():
                        report.duplicates += 1
                        problems.add(
                            f"{item.path}: same content as {row.path}, already in the "
                            "workspace; labels of this file apply to that image"
                        )
                    else:
                        report.moved += 1
                        session.execute(update(Image).where(Image.id == row.id).values(path=path))
            if new_rows:
                session.execute(insert(Image), new_rows)
                report.new_images += len(new_rows)
            ids = dict(
                session.execute(
                    select(Image.content_hash, Image.id).where(Image.content_hash.in_(hashes))
                ).all()
            )
            for item in batch:
                registered[item.content_hash] = _Registered(
                    ids[item.content_hash], item.width, item.height, item.path
                )
    if other_split:
        problems.add(
            f"{images_dir}: {other_split} images were already in another split than "
            f"{options.split!r}; they stay where they are"
        )
    return {item.key: registered[item.content_hash] for item in scanned}


# 3. Labels


@dataclass
class _Source:
    """Labels of one annotation source, plus how to turn YOLO files into pixel boxes."""

    name: str
    labels: list[ImageLabels]
    yolo_files: list = field(default_factory=list)
    file_classes: list[str] = field(default_factory=list)


def _read_sources(
    options: IngestOptions,
    classes: list[str],
    classes_file: Path | None,
    file_classes: list[str],
    mask_class: str,
    problems: _ProblemLog,
) -> list[_Source]:
    sources = []
    if options.tags_csv is not None:
        labels, found = read_tags_csv(options.tags_csv, classes)
        problems.extend(found)
        sources.append(_Source("tags", labels))
    if options.yolo_dir is not None:
        for index, name in enumerate(file_classes):
            if name not in classes:
                problems.add(
                    f"{classes_file}: class {name!r} (id {index}) is not a workspace class; its "
                    f"boxes are skipped (`pyrolabel init --classes {','.join(classes)},{name}` "
                    "adds it)"
                )
        files, found = read_yolo_dir(options.yolo_dir, classes)
        problems.extend(found)
        sources.append(_Source("yolo", [], yolo_files=files, file_classes=file_classes))
    if options.coco_json is not None:
        labels, found = read_coco(options.coco_json, classes)
        problems.extend(found)
        sources.append(_Source("coco", labels))
    if options.voc_dir is not None:
        labels, found = read_voc_dir(options.voc_dir, classes)
        problems.extend(found)
        sources.append(_Source("voc", labels))
    if options.masks_dir is not None:
        labels, found = read_masks_dir(Path(options.masks_dir).resolve(), mask_class)
        problems.extend(found)
        sources.append(_Source("masks", labels))
    return sources


def _ingest_labels(
    workspace: Workspace,
    by_key: dict[str, _Registered],
    bad_keys: list[str],
    sources: list[_Source],
    classes: list[str],
    options: IngestOptions,
    report: IngestReport,
    problems: _ProblemLog,
) -> None:
    index, bad_index = ImageKeyIndex(by_key), ImageKeyIndex(bad_keys)
    box_origin = BoxOrigin.REFERENCE if options.tags_only else BoxOrigin.GIVEN
    mask_origin = MaskOrigin.REFERENCE if options.tags_only else MaskOrigin.GIVEN

    # Match every label to its image and turn it into boxes, tags and masks per image.
    boxes: dict[int, list] = defaultdict(list)
    masks: dict[int, list[tuple[str, str]]] = defaultdict(list)
    # image id -> class -> [(present, explicit, source)]
    tag_votes: dict[int, dict[str, list[tuple[bool, bool, str]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for source in sources:
        items = source.labels or source.yolo_files
        for item in tqdm(items, desc=source.name, unit="file", disable=not options.progress):
            key, reason = index.match(item.key)
            where = item.source if isinstance(item, ImageLabels) else item.path
            if key is None:
                if bad_index.match(item.key)[0] is not None:
                    reason = "its image was skipped as unusable (see that file's line)"
                problems.add(f"{where}: {reason}; label skipped")
                continue
            image = by_key[key]
            if source.name == "yolo":
                labels, found = yolo_labels(
                    item, image.width, image.height, source.file_classes, classes
                )
                problems.extend(found)
            else:
                labels = item
            if labels.size is not None and labels.size != (image.width, image.height):
                problems.add(
                    f"{where}: states a {labels.size[0]}x{labels.size[1]} image, but the image "
                    f"shows as {image.width}x{image.height}; its labels are skipped"
                )
                continue
            problems.extend(clip_labels(labels, image.width, image.height))

            boxes[image.id].extend(labels.boxes)
            if labels.mask_path is not None:
                masks[image.id].append((labels.mask_class, labels.mask_path))
            for cls, present in labels.tags.items():
                explicit = source.name == "tags"
                tag_votes[image.id][cls].append((present, explicit, where))
            if labels.boxes_complete:
                with_box = {box.class_name for box in labels.boxes}
                for cls in classes:
                    if cls in with_box:
                        tag_votes[image.id][cls].append((True, False, where))
                    elif not labels.is_unsure(cls):
                        tag_votes[image.id][cls].append((False, False, where))

    tags = {
        image_id: {cls: _decide_tag(votes, cls, problems) for cls, votes in per_class.items()}
        for image_id, per_class in tag_votes.items()
    }
    paths = {image.id: image.path for image in by_key.values()}
    _write_labels(workspace, paths, tags, boxes, masks, box_origin, mask_origin, report, problems)


def _decide_tag(votes: list[tuple[bool, bool, str]], cls: str, problems: _ProblemLog) -> bool:
    """One tag from several sources: an explicit tag (CSV) wins, then any positive evidence."""
    values = {present for present, _, _ in votes}
    explicit = [present for present, is_explicit, _ in votes if is_explicit]
    decided = explicit[0] if explicit else True in values
    if len(values) > 1:
        said = "; ".join(f"{where} says {'present' if p else 'absent'}" for p, _, where in votes)
        problems.add(f"{votes[0][2]}: {cls} tags disagree ({said}); kept {decided}")
    return decided


def _write_labels(
    workspace: Workspace,
    paths: dict[int, Path],
    tags: dict[int, dict[str, bool]],
    boxes: dict[int, list],
    masks: dict[int, list[tuple[str, str]]],
    box_origin: str,
    mask_origin: str,
    report: IngestReport,
    problems: _ProblemLog,
) -> None:
    """Insert what is not there yet, a chunk of images per transaction."""
    now = datetime.now(UTC)
    image_ids = sorted(set(tags) | set(boxes) | set(masks))
    for batch in chunked(image_ids):
        with workspace.transaction() as session:
            ids = class_ids(session)
            stored_tags = _stored_tags(session, batch)
            stored_boxes = _stored_boxes(session, batch, box_origin)
            stored_masks = {
                (image_id, class_id)
                for image_id, class_id in session.execute(
                    select(Mask.image_id, Mask.class_id).where(
                        Mask.image_id.in_(batch),
                        Mask.origin == mask_origin,
                        Mask.proposal_run_id.is_(None),
                    )
                )
            }
            tag_rows, box_rows, mask_rows = [], [], []
            for image_id in batch:
                for cls, present in tags.get(image_id, {}).items():
                    stored = stored_tags.get((image_id, ids[cls]))
                    if stored is None:
                        tag_rows.append(
                            {
                                "image_id": image_id,
                                "class_id": ids[cls],
                                "present": present,
                                "origin": TagOrigin.GIVEN,
                                "updated_by": INGEST_USER,
                                "updated_at": now,
                            }
                        )
                    elif stored != present:
                        problems.add(
                            f"{paths[image_id]}: the given {cls} tag is stored as "
                            f"{'present' if stored else 'absent'}; this ingest says "
                            f"{'present' if present else 'absent'}; the stored tag is kept"
                        )
                seen = stored_boxes.get(image_id, [])
                for box in boxes.get(image_id, []):
                    corners = (ids[box.class_name], box.x1, box.y1, box.x2, box.y2)
                    if any(_same_box(corners, other) for other in seen):
                        continue
                    seen.append(corners)
                    box_rows.append(
                        {
                            "image_id": image_id,
                            "class_id": ids[box.class_name],
                            "x1": box.x1,
                            "y1": box.y1,
                            "x2": box.x2,
                            "y2": box.y2,
                            "origin": box_origin,
                            "status": BoxStatus.ACCEPTED,
                            "score": box.score,
                            "updated_by": INGEST_USER,
                            "created_at": now,
                            "updated_at": now,
                        }
                    )
                for cls, path in masks.get(image_id, []):
                    if (image_id, ids[cls]) in stored_masks:
                        continue
                    stored_masks.add((image_id, ids[cls]))
                    mask_rows.append(
                        {
                            "image_id": image_id,
                            "class_id": ids[cls],
                            "path": _stored_path(workspace, Path(path)),
                            "origin": mask_origin,
                            "created_at": now,
                        }
                    )
            for table, rows in ((Tag, tag_rows), (Box, box_rows), (Mask, mask_rows)):
                if rows:
                    session.execute(insert(table), rows)
            report.tags += len(tag_rows)
            report.boxes += len(box_rows)
            report.masks += len(mask_rows)


def _stored_tags(session: Session, image_ids: list[int]) -> dict[tuple[int, int], bool]:
    rows = session.execute(
        select(Tag.image_id, Tag.class_id, Tag.present).where(
            Tag.image_id.in_(image_ids), Tag.origin == TagOrigin.GIVEN
        )
    )
    return {(image_id, class_id): bool(present) for image_id, class_id, present in rows}


def _stored_boxes(
    session: Session, image_ids: list[int], origin: str
) -> dict[int, list[tuple[int, float, float, float, float]]]:
    stored: dict[int, list] = defaultdict(list)
    rows = session.execute(
        select(Box.image_id, Box.class_id, Box.x1, Box.y1, Box.x2, Box.y2).where(
            Box.image_id.in_(image_ids), Box.origin == origin
        )
    )
    for image_id, *corners in rows:
        stored[image_id].append(tuple(corners))
    return stored


def _same_box(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(
        abs(p - q) <= SAME_BOX_PX for p, q in zip(a[1:], b[1:], strict=True)
    )
