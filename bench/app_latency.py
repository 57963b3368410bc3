"""How fast the review app answers a reviewer, in a real browser, on a large workspace.

    .venv/bin/python -m bench.app_latency                                # 100 000 images, 100 keys
    .venv/bin/python -m bench.app_latency --images 2000 --decisions 20   # a quicker look
    .venv/bin/python -m bench.app_latency --workspace /tmp/ws100k --reuse --json latency.json

The workspace holds generated proposals (db.synthetic): N images with 3 pending pseudo boxes
each, pointing at the real 608x608 photos of assets/demo/images, with CAM and mask PNGs. Without
--workspace it is built in a temporary folder and removed afterwards; with --workspace it is
kept, and --reuse measures it again without rebuilding (earlier decisions only shorten the
queue). Then `pyrolabel serve` starts on a loopback port and Debian's chromium opens the review
page, and the bench measures:

    first page, cold    navigation to the first image shown, the server's first page load
    first page, warm    the same after a reload (a new Streamlit session on a warm server)
    keystroke           key press to the next image shown, over --decisions decisions

"Shown" means the "Image N" label names a new image and the picture (an <img> in the page)
has a new source that has finished loading. Times are taken inside the page with
performance.now(), polled once per animation frame (about 17 ms resolution), from the keydown
event (or the navigation start). Each decision is one key: Shift+A accepts every pending box of
the image, which leaves nothing pending, so the next image opens (--key e marks "nothing here",
--key n only moves on). Like a reviewer, the bench presses the next key once the page has
finished its script run and --think-ms has passed, so the background prefetch of the next image
has that long to work.

The keystroke row is split into milestones (script run started, label shown, picture loaded,
page idle) and followed by the server's own steps for one decision (accept, queue claim, image
view, base layer render, JPEG), timed in this process on the same workspace once the server is
stopped; what is left is Streamlit's rerun of the page and the browser's drawing of it. The
JSON keeps every keystroke with its wall-clock start, to match against a --server-log written
with STREAMLIT_LOGGER_LEVEL=debug (which stamps each script run). The 1-minute load average
is printed too: on a shared machine, compare runs only at similar load.

Targets: first page under 3 s, next image p95 under 400 ms on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import distinct, func, select

from app.commands import serve
from app.ui.overlays import (
    DrawBox,
    Layers,
    compose_base,
    display_scale,
    display_size,
    draw_boxes,
    encode_jpeg,
)
from db import queue, review
from db.models import Box, Image, ReviewEvent
from db.synthetic import SyntheticConfig, build_proposals
from db.workspace import Workspace

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_IMAGES = REPO_ROOT / "assets" / "demo" / "images"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The keys a decision can be made with; each one moves to the next image.
DECISION_KEYS = {
    "Shift+A": "accept all pending boxes",
    "e": "nothing here",
    "n": "next image (no decision written)",
}
TARGET_FIRST_PAGE_MS = 3000.0
TARGET_NEXT_IMAGE_P95_MS = 400.0
# Streamlit starts in seconds, far longer on a loaded 2-core machine.
SERVER_START_TIMEOUT_S = 120.0
STEP_TIMEOUT_MS = 60_000
# What a watch in the page records, in the order they usually come.
MILESTONES = ("running", "label", "picture", "shown", "idle")

# Installed in every document before its own scripts (Playwright's add_init_script). A watch
# polls the page once per animation frame and resolves with the performance.now() times of its
# milestones; the first page's watch starts with the document, a keystroke's just before the key.
WATCH_JS = """
(() => {
  const shownImage = () => {
    for (const el of document.querySelectorAll("strong")) {
      const match = /^Image (\\d+)$/.exec(el.textContent.trim());
      if (match) return Number(match[1]);
    }
    return null;
  };
  const picture = () => {
    const img = document.querySelector('[data-testid="stImage"] img');
    return img ? {src: img.currentSrc || img.src, loaded: img.complete && img.naturalWidth > 0}
               : {src: null, loaded: false};
  };
  const scriptState = () => document.querySelector("[data-testid=stApp]")
    ?.getAttribute("data-test-script-state");

  const bench = {
    keyAt: null,
    pending: null,
    snapshot: () => ({image: shownImage(), src: picture().src}),
    watch(before, timeoutMs) {
      const startedAt = performance.now();
      const marks = {};
      return new Promise((resolve) => {
        const done = (timedOut) =>
          resolve({key: bench.keyAt, origin: performance.timeOrigin, marks, timedOut});
        const frame = () => {
          const now = performance.now();
          const state = scriptState();
          const shown = picture();
          const image = shownImage();
          if (marks.running === undefined && state && state !== "notRunning") marks.running = now;
          if (marks.picture === undefined && shown.src && shown.src !== before.src && shown.loaded)
            marks.picture = now;
          if (marks.label === undefined && image !== null && image !== before.image) {
            marks.label = now;
            marks.image = image;
          }
          if (marks.shown === undefined && marks.picture !== undefined &&
              marks.label !== undefined) marks.shown = now;
          if (marks.shown !== undefined && state === "notRunning") {
            marks.idle = now;
            return done(false);
          }
          if (now - startedAt > timeoutMs) return done(true);
          requestAnimationFrame(frame);
        };
        requestAnimationFrame(frame);
      });
    },
  };
  window.__bench = bench;
  window.addEventListener("keydown", () => { bench.keyAt = performance.now(); }, true);
  bench.pending = bench.watch({image: null, src: null}, TIMEOUT_MS);
})();
""".replace("TIMEOUT_MS", str(STEP_TIMEOUT_MS))


# ---------------------------------------------------------------------------------------------
# Numbers


def summarize(values_ms: list[float]) -> dict[str, float]:
    """n, p50, p95, max and mean of a list of milliseconds (linear-interpolated percentiles)."""
    if not values_ms:
        nan = float("nan")
        return {"n": 0, "p50": nan, "p95": nan, "max": nan, "mean": nan}
    values = np.asarray(values_ms, np.float64)
    return {
        "n": int(values.size),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


def milestones(result: dict) -> dict[str, float]:
    """A watch's result as milliseconds after the key press (or the navigation start).

    Also "start_unix_s", the wall-clock time of the key press (or navigation start), to match
    the milestones against the server's log.
    """
    start = result["key"] if result["key"] is not None else 0.0
    marks = {name: at - start for name, at in result["marks"].items() if name in MILESTONES}
    marks["start_unix_s"] = (result["origin"] + start) / 1000
    return marks


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(row[k])) for row in [header, *rows]) for k in range(len(header))]

    def line(cells):
        padded = [
            str(cell).ljust(width) if k == 0 else str(cell).rjust(width)
            for k, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


# ---------------------------------------------------------------------------------------------
# The workspace


def workspace_counts(workspace: Workspace) -> tuple[int, int]:
    """(images, boxes) in the workspace."""
    with workspace.session() as session:
        return (
            int(session.scalar(select(func.count(Image.id)))),
            int(session.scalar(select(func.count(Box.id)))),
        )


def prepare_workspace(
    root: Path, *, images: int, boxes_per_image: int, reuse: bool
) -> tuple[Workspace, float | None]:
    """The workspace to measure and the seconds its build took (None when reused)."""
    workspace = Workspace(root)
    exists = (root / "pyrolabel.db").exists()
    if exists and reuse:
        workspace.check_ready()
        return workspace, None
    if exists:
        raise SystemExit(
            f"error: {root} already holds a workspace; pass --reuse to measure it again, or "
            "another --workspace to build a new one"
        )
    pool = sorted(p for p in DEMO_IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    if not pool:
        raise SystemExit(f"error: no images under {DEMO_IMAGES}; the demo set ships with the repo")
    started = time.perf_counter()
    workspace.init(["fire", "smoke"])
    build_proposals(
        workspace,
        SyntheticConfig(
            n_images=images, boxes_per_image=boxes_per_image, image_pool=pool, scenes=len(pool)
        ),
    )
    return workspace, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# The server and the browser


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(workspace: Workspace, port: int, log_path: Path) -> tuple[subprocess.Popen, float]:
    """The review app on 127.0.0.1:port and the seconds until it answered its health check."""
    log = open(log_path, "w")  # noqa: SIM115 - the child process writes it until stopped
    started = time.perf_counter()
    process = serve.launch(
        workspace, host="127.0.0.1", port=port, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        serve.wait_until_ready(f"http://127.0.0.1:{port}", process, SERVER_START_TIMEOUT_S)
    except RuntimeError as err:
        stop_server(process)
        raise SystemExit(f"error: {err}; its log:\n{log_path.read_text()}") from err
    return process, time.perf_counter() - started


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def await_watch(page, what: str) -> dict:
    """Wait for the page's running watch; its result, or an error naming what never came."""
    result = page.evaluate("window.__bench.pending")
    if result["timedOut"]:
        missing = [m for m in ("picture", "label", "shown", "idle") if m not in result["marks"]]
        raise RuntimeError(
            f"{what}: no {missing[0]} within {STEP_TIMEOUT_MS / 1000:.0f} s "
            f"(seen: {sorted(result['marks'])})"
        )
    return result


def first_page(page, url: str | None) -> tuple[dict[str, float], int]:
    """Open (url) or reload (None) the review page; milestones after the navigation start."""
    if url is None:
        page.reload(wait_until="commit")
    else:
        page.goto(url, wait_until="commit")
    result = await_watch(page, "first page")
    return milestones(result), result["marks"]["image"]


def decide(page, key: str, think_s: float) -> tuple[dict[str, float], int]:
    """One keystroke on an idle page; its milestones and the image it led to."""
    time.sleep(think_s)
    page.evaluate(
        "(timeout) => { const b = window.__bench; b.keyAt = null;"
        " b.pending = b.watch(b.snapshot(), timeout); }",
        STEP_TIMEOUT_MS,
    )
    page.keyboard.press(key)
    result = await_watch(page, f"key {key}")
    if result["key"] is None:
        raise RuntimeError(f"the page never saw the key {key}")
    return milestones(result), result["marks"]["image"]


def measure_browser(url: str, args: argparse.Namespace, reviewer: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.add_init_script(WATCH_JS)
            page = context.new_page()

            cold, _ = first_page(page, f"{url}/?reviewer={reviewer}")
            warm, shown = first_page(page, None)

            keystrokes, seen = [], [shown]
            for _ in range(args.decisions):
                marks, shown = decide(page, args.key, args.think_ms / 1000)
                keystrokes.append(marks)
                seen.append(shown)
            context.close()
        finally:
            browser.close()
    return {"cold": cold, "warm": warm, "keystrokes": keystrokes, "images_seen": seen}


# ---------------------------------------------------------------------------------------------
# The server's steps for one decision, timed here


def time_server_steps(workspace: Workspace, reviewer: str, count: int) -> dict[str, list[float]]:
    """Milliseconds per call of what a Shift+A keystroke makes the server do, `count` times.

    In the app's order: the accept (a transaction), the view that finds nothing pending, the
    claim of the next image, its view, its base layer (the app renders it ahead in a background
    thread; here it is timed in the open), boxes and JPEG, and the prefetch's queue page. The
    queue size (the sidebar count, cached for 30 s) is timed too: a full count, not per key.
    """
    import streamlit.logger

    # The review module holds st.cache_data functions, which warn outside a running app.
    streamlit.logger.set_log_level("error")
    from app.ui.review import load_view

    steps: dict[str, list[float]] = {}

    def timed(name, call):
        started = time.perf_counter()
        value = call()
        steps.setdefault(name, []).append((time.perf_counter() - started) * 1000)
        return value

    state = queue.QueueState()
    layers_for = {"fire": Layers(mask_class="fire"), "smoke": Layers(mask_class="smoke")}

    def claim():
        with workspace.transaction() as session:
            return queue.claim_next(session, reviewer=reviewer, state=state)

    item = claim()
    for _ in range(count):
        if item is None:
            break
        view = load_view(workspace, item.image_id)
        versions = {b.id: b.version for b in view.pending}

        def accept(view=view, versions=versions):
            with workspace.transaction() as session:
                review.accept_all(
                    session, image_id=view.image_id, reviewer=reviewer, box_versions=versions
                )

        timed("accept all (transaction)", accept)
        timed("image view, after the accept", lambda v=view: load_view(workspace, v.image_id))
        item = timed("claim next image (transaction)", claim)
        if item is None:
            break
        view = timed("image view, next image", lambda i=item: load_view(workspace, i.image_id))
        source = view.source
        size = display_size(source.width, source.height)
        top = view.pending[0].class_name if view.pending else "fire"
        base = timed(
            "base layer (prefetched in the app)",
            lambda s=source, t=top, z=size: compose_base(s, layers_for[t], z),
        )
        boxes = [DrawBox(b.x1, b.y1, b.x2, b.y2, b.status, b.class_name) for b in view.boxes]
        scale = display_scale(source.width, source.height)
        timed("boxes and JPEG", lambda b=base, x=boxes, s=scale: encode_jpeg(draw_boxes(b, x, s)))

        def page_ahead():
            with workspace.session() as session:
                return queue.queue_page(session, reviewer=reviewer, after=state.cursor)

        timed("queue page (prefetch)", page_ahead)

    def size():
        with workspace.session() as session:
            return queue.queue_size(session, reviewer=reviewer)

    for _ in range(3):
        timed("queue size (every 30 s)", size)
    with workspace.transaction() as session:
        if item is not None:
            queue.release_lease(session, image_id=item.image_id, reviewer=reviewer)
    return steps


def decided_images(workspace: Workspace, reviewer: str) -> int:
    with workspace.session() as session:
        query = select(func.count(distinct(ReviewEvent.image_id))).where(
            ReviewEvent.reviewer == reviewer
        )
        return int(session.scalar(query))


# ---------------------------------------------------------------------------------------------
# The report


def report(result: dict) -> str:
    config = result["config"]
    build = (
        "reused" if result["build_seconds"] is None else f"built in {result['build_seconds']:.1f} s"
    )
    lines = [
        f"review app latency: {result['images']} images, {result['boxes']} boxes ({build}); "
        f"server up in {result['server_start_seconds']:.1f} s; {os.cpu_count()} CPU cores, "
        f"load average {result['load_before']:.1f} before, {result['load_after']:.1f} after",
        f"key {config['key']} ({DECISION_KEYS[config['key']]}), {config['decisions']} decisions, "
        f"{config['think_ms']:.0f} ms between idle page and next key; "
        f"{result['images_decided']} images decided",
        "",
    ]
    rows = [
        [
            "first page, cold (to image shown)",
            "1",
            _ms(result["cold"]["shown"]),
            "",
            "",
            f"< {TARGET_FIRST_PAGE_MS:.0f}",
        ],
        ["first page, warm reload", "1", _ms(result["warm"]["shown"]), "", "", ""],
    ]
    for name, label in (
        ("running", "key -> script run started"),
        ("label", "key -> image label shown"),
        ("picture", "key -> picture loaded"),
        ("shown", "key -> next image shown"),
        ("idle", "key -> page idle"),
    ):
        stats = result["keystroke"][name]
        target = f"p95 < {TARGET_NEXT_IMAGE_P95_MS:.0f}" if name == "shown" else ""
        rows.append(
            [
                label,
                str(stats["n"]),
                _ms(stats["p50"]),
                _ms(stats["p95"]),
                _ms(stats["max"]),
                target,
            ]
        )
    lines.append(markdown_table(["measure", "n", "p50 ms", "p95 ms", "max ms", "target"], rows))

    if result["server_steps"]:
        lines += ["", "server steps for one decision, timed in this process on the same workspace:"]
        step_rows = [
            [name, str(stats["n"]), f"{stats['p50']:.1f}", f"{stats['p95']:.1f}"]
            for name, stats in result["server_steps"].items()
        ]
        lines.append(markdown_table(["step", "n", "p50 ms", "p95 ms"], step_rows))

    verdicts = [
        ("first page", result["cold"]["shown"] < TARGET_FIRST_PAGE_MS),
        ("next image p95", result["keystroke"]["shown"]["p95"] < TARGET_NEXT_IMAGE_P95_MS),
    ]
    lines += ["", "targets: " + ", ".join(f"{n} {'met' if ok else 'MISSED'}" for n, ok in verdicts)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--boxes-per-image", type=int, default=3)
    parser.add_argument("--decisions", type=int, default=100, help="keystrokes to time")
    parser.add_argument("--key", choices=list(DECISION_KEYS), default="Shift+A")
    parser.add_argument(
        "--think-ms", type=float, default=500.0, help="pause between an idle page and the next key"
    )
    parser.add_argument(
        "--workspace", type=Path, help="build here and keep it (default: a temp dir)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="measure an existing --workspace again"
    )
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument(
        "--steps", type=int, default=20, help="decisions for the server steps (0: skip)"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--server-log", type=Path, help="keep the server's output here")
    args = parser.parse_args(argv)
    if args.reuse and args.workspace is None:
        parser.error("--reuse needs --workspace")
    if not CHROMIUM.exists():
        parser.error(f"{CHROMIUM} is missing; install Debian's chromium (apt-get install chromium)")

    scratch = Path(tempfile.mkdtemp(prefix="pyrolabel-bench-app-"))
    root = args.workspace.resolve() if args.workspace else scratch / "workspace"
    process = None
    try:
        # The workspace.
        workspace, build_seconds = prepare_workspace(
            root, images=args.images, boxes_per_image=args.boxes_per_image, reuse=args.reuse
        )
        images, boxes = workspace_counts(workspace)
        print(
            f"workspace {root}: {images} images, {boxes} boxes "
            + ("(reused)" if build_seconds is None else f"(built in {build_seconds:.1f} s)"),
            flush=True,
        )

        # The server, then the browser. A reviewer name of its own per run, so the images this
        # run decided can be counted.
        port = args.port or free_port()
        log_path = args.server_log.resolve() if args.server_log else scratch / "serve.log"
        process, server_seconds = start_server(workspace, port, log_path)
        print(f"review app on port {port} in {server_seconds:.1f} s", flush=True)
        reviewer = f"bench-{int(time.time())}"
        load_before = os.getloadavg()[0]
        try:
            browser = measure_browser(f"http://127.0.0.1:{port}", args, reviewer)
        except RuntimeError as err:
            raise SystemExit(
                f"error: {err}; the server's log:\n{log_path.read_text()[-4000:]}"
            ) from err
        load_after = os.getloadavg()[0]
        stop_server(process)
        process = None

        # The server's steps, once the server is gone, so they do not share the CPU with it.
        steps = time_server_steps(workspace, f"{reviewer}-steps", args.steps) if args.steps else {}

        keystroke = {
            name: summarize([marks[name] for marks in browser["keystrokes"] if name in marks])
            for name in MILESTONES
        }
        result = {
            "config": {
                "images": args.images,
                "boxes_per_image": args.boxes_per_image,
                "decisions": args.decisions,
                "key": args.key,
                "think_ms": args.think_ms,
            },
            "workspace": str(root),
            "images": images,
            "boxes": boxes,
            "build_seconds": build_seconds,
            "server_start_seconds": server_seconds,
            "load_before": load_before,
            "load_after": load_after,
            "cold": browser["cold"],
            "warm": browser["warm"],
            "keystroke": keystroke,
            "keystrokes": browser["keystrokes"],
            "images_seen": browser["images_seen"],
            "images_decided": decided_images(workspace, reviewer),
            "server_steps": {name: summarize(values) for name, values in steps.items()},
        }
        workspace.dispose()

        print()
        print(report(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
            print(f"\nwrote {args.json}")
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
