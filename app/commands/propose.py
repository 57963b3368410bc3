"""`pyrolabel propose`: run the classifier over a split; CAMs, masks and pseudo boxes.

Writes cams/run-<id>/<image id>_<class>.png and masks/run-<id>/<image id>_<class>.png (the
foreground probability times 255; the mask is pixel >= threshold * 255), the classifier's
probabilities as model tags, and pseudo boxes (pending) in one proposal run. Interrupted, the
same command continues the run: images already stored are skipped. Under torchrun each rank
takes its own slice of the images.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from core.cam import InferenceConfig
from core.device import pick_device
from core.distributed import barrier, init_distributed
from core.propose import (
    cam_outside_boxes,
    iter_proposals,
    proposal_boxes,
    proposal_uncertainty,
    save_proposal_pngs,
)
from core.rsepm import load_rsepm
from db.proposals import (
    ProposedImage,
    finish_proposal_run_if_complete,
    get_model_version,
    images_to_propose,
    open_proposal_run,
    write_proposals,
)
from db.workspace import Workspace

# Images per database commit: a crash loses at most this many images' work.
COMMIT_EVERY = 64


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("propose", help="CAMs, masks and pseudo boxes for a split")
    parser.add_argument("--split", help="split to run over (default: every image)")
    parser.add_argument("--model", type=int, help="classifier model version id (default: newest)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="foreground probability a mask pixel needs (default: %(default)s)",
    )
    parser.add_argument(
        "--image-size", type=int, help="working resolution (default: the training size)"
    )
    parser.add_argument(
        "--scales",
        default="0.5,1.0,1.5",
        help="comma-separated inference scales (default: %(default)s)",
    )
    parser.add_argument("--no-flip", action="store_true", help="skip the flipped views")
    parser.add_argument("--pamr", action="store_true", help="refine masks along image colours")
    parser.add_argument(
        "--min-area-frac",
        type=float,
        default=0.001,
        help="drop mask fragments smaller than this share of the image",
    )
    parser.add_argument("--workers", type=int, default=2, help="image reading processes")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when there is one)")
    return parser


def run(args: argparse.Namespace, workspace: Workspace) -> int:
    started = time.monotonic()

    # The model.
    with workspace.session() as session:
        version = get_model_version(session, kind="classifier", model_id=args.model)
        if version is None:
            which = f"classifier model {args.model}" if args.model else "a classifier model"
            print(f"error: no {which}; run `pyrolabel train classifier` first", file=sys.stderr)
            return 1
        model_id, model_path = version.id, workspace.absolute(version.path)
    device = pick_device(args.device)
    model, meta = load_rsepm(model_path, device)
    classes = list(meta["classes"])
    image_size = args.image_size or int(meta.get("config", {}).get("image_size", 224))
    try:
        scales = tuple(float(s) for s in args.scales.split(",") if s.strip())
    except ValueError:
        print(f"error: --scales {args.scales!r} is not a list of numbers", file=sys.stderr)
        return 2
    inference = InferenceConfig(
        scales=scales, flip=not args.no_flip, pamr_iterations=10 if args.pamr else 0
    )
    params = {
        "threshold": args.threshold,
        "image_size": image_size,
        "scales": list(scales),
        "flip": inference.flip,
        "class_threshold": inference.class_threshold,
        "pamr": args.pamr,
        "min_area_frac": args.min_area_frac,
    }

    # The run: rank 0 opens (or finds the interrupted) run; the others then find the same one.
    dist_info = init_distributed(device)
    run_id = None
    if dist_info.is_main:
        with workspace.transaction() as session:
            run_id, resumed = open_proposal_run(
                session, model_version_id=model_id, split=args.split, params=params
            )
    barrier(dist_info)
    if not dist_info.is_main:
        with workspace.transaction() as session:
            run_id, resumed = open_proposal_run(
                session, model_version_id=model_id, split=args.split, params=params
            )
    with workspace.session() as session:
        todo = images_to_propose(session, run_id=run_id, split=args.split)
    barrier(dist_info)
    if dist_info.is_main and resumed:
        print(f"resuming proposal run {run_id}: {len(todo)} images left")
    cam_rel, mask_rel = f"cams/run-{run_id}", f"masks/run-{run_id}"
    cam_dir, mask_dir = workspace.root / cam_rel, workspace.root / mask_rel

    # Propose, committing every COMMIT_EVERY images.
    paths = [str(workspace.absolute(path)) for _, path, _, _ in todo]
    image_ids = [image_id for image_id, _, _, _ in todo]
    mine = len(range(dist_info.rank, len(paths), dist_info.world_size))
    pending: list[ProposedImage] = []
    counts = {"images": 0, "boxes": 0, "errors": 0}
    tagged = dict.fromkeys(classes, 0)

    def flush() -> None:
        if pending:
            with workspace.transaction() as session:
                write_proposals(session, run_id=run_id, items=pending)
            pending.clear()

    bar = tqdm(total=mine, desc="propose", unit="img", disable=not dist_info.is_main)
    try:
        for proposal in iter_proposals(
            model,
            paths,
            image_size=image_size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=device,
            inference=inference,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        ):
            bar.update(1)
            if proposal.error:
                counts["errors"] += 1
                tqdm.write(f"skipped {proposal.error}", file=sys.stderr)
                continue
            image_id = image_ids[proposal.index]
            save_proposal_pngs(
                proposal, classes, image_id=image_id, cams_dir=cam_dir, masks_dir=mask_dir
            )
            boxes = proposal_boxes(
                proposal, threshold=args.threshold, min_area_frac=args.min_area_frac
            )
            probs = {name: float(p) for name, p in zip(classes, proposal.probs, strict=True)}
            pending.append(
                ProposedImage(
                    image_id=image_id,
                    probs=probs,
                    boxes=[
                        (classes[c], b.x1, b.y1, b.x2, b.y2, b.score)
                        for c, found in boxes.items()
                        for b in found
                        if b.x1 < b.x2 and b.y1 < b.y2
                    ],
                    cam_dir=cam_rel,
                    mask_dir=mask_rel,
                    uncertainty=proposal_uncertainty(proposal, boxes, box_threshold=args.threshold),
                    disagreement=cam_outside_boxes(proposal, boxes),
                )
            )
            counts["images"] += 1
            counts["boxes"] += len(pending[-1].boxes)
            for name, p in probs.items():
                tagged[name] += p >= 0.5
            if len(pending) >= COMMIT_EVERY:
                flush()
        flush()
    finally:
        bar.close()

    # Close the run once every rank is through.
    barrier(dist_info)
    done = False
    if dist_info.is_main:
        with workspace.transaction() as session:
            done = finish_proposal_run_if_complete(session, run_id=run_id)
    seconds = time.monotonic() - started
    rate = counts["images"] / seconds if seconds > 0 else 0.0
    tags = ", ".join(f"{name} on {n}" for name, n in tagged.items())
    state = "done" if done else "incomplete (rerun to retry the skipped images)"
    print(
        f"proposal run {run_id} (model {model_id}, split {args.split or 'all'}): "
        f"{counts['images']} images in {seconds:.0f} s ({rate:.1f} img/s), "
        f"{counts['boxes']} pseudo boxes, tagged {tags}; {counts['errors']} unreadable; {state}"
    )
    return 0
