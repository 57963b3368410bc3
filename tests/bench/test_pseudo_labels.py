"""The bench's data handling and scoring; the full run (training included) is not a test."""

import math

import cv2
import numpy as np
import pytest

from bench.pseudo_labels import (
    METHODS,
    UNKNOWN,
    BenchConfig,
    Item,
    MethodScores,
    choose,
    fire_boxes_group,
    load_bench_data,
    load_fire_boxes,
    markdown_table,
    split_by_group,
    spread_subset,
    threshold_grid,
    threshold_label,
)


def test_fire_boxes_groups_follow_clips_and_number_blocks():
    assert fire_boxes_group("fire1_mp4-23_jpg_ae8ce751.jpg") == "fire1"
    assert fire_boxes_group("pexels-alan-w-8365993_mp4-4_jpg_x.jpg") == "pexels-alan-w-8365993"
    assert fire_boxes_group("img_934_jpg_d56fbd80.jpg") == "img_block_9"
    assert fire_boxes_group("img_9_jpg_87ae6291.jpg") == "img_block_0"
    assert fire_boxes_group("street.jpg") == "street"


def _items(rng, n_groups):
    items = []
    for g in range(n_groups):
        for k in range(int(rng.integers(1, 12))):
            items.append(Item(f"/x/{g}_{k}.jpg", "s", f"group{g}", 10, 10, (1.0, 0.0)))
    return items


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_keeps_groups_whole_and_repeats(seed):
    items = _items(np.random.default_rng(seed), 30)
    train, held = split_by_group(items, 0.25)
    assert len(train) + len(held) == len(items)
    assert not {i.group for i in train} & {i.group for i in held}
    # Groups hold 1-11 images: the greedy choice lands within half a group of the target.
    assert abs(len(held) - 0.25 * len(items)) <= 6
    again_train, again_held = split_by_group(list(reversed(items)), 0.25)
    assert {i.path for i in again_held} == {i.path for i in held}
    other_train, other_held = split_by_group(items, 0.25, salt="another")
    assert {i.path for i in other_held} != {i.path for i in held}


def test_spread_subset_spans_the_list():
    items = list(range(100))
    assert spread_subset(items, 5) == [0, 25, 50, 74, 99]
    assert spread_subset(items, None) == items


def test_load_fire_boxes_reads_yolo_in_pixels(tiny_dataset):
    items = {item.path.split("/")[-1]: item for item in load_fire_boxes(tiny_dataset.root)}
    assert set(items) == set(tiny_dataset.boxes)
    for name, boxes in tiny_dataset.boxes.items():
        item = items[name]
        assert item.has_boxes and (item.width, item.height) == (64, 48)
        want = sorted((x1, y1, x2, y2, ("fire", "smoke").index(c)) for c, x1, y1, x2, y2 in boxes)
        got = sorted(item.boxes)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g[4] == w[4]
            np.testing.assert_allclose(g[:4], w[:4], atol=1e-3)
        assert item.tags == tuple(float(tiny_dataset.tags[name][c]) for c in ("fire", "smoke"))


def test_method_scores_hand_made(tmp_path):
    size = 32
    scores = MethodScores("CAM", min_area_frac=0.001)
    grid = list(threshold_grid("CAM"))
    at = {t: grid.index(t) for t in (0.3, 0.4, 0.5, 0.6, 0.8)}

    # A boxed image: a fire blob of 0.55 at the working size maps to the reference box.
    boxed = Item("/a.jpg", "fire-boxes", "a", 64, 64, (1.0, 0.0), ((16, 16, 48, 48, 0),), True)
    maps = np.zeros((2, size, size), np.float32)
    maps[0, 8:24, 8:24] = 0.55
    scores.update(boxed, maps, np.array([0.8, 0.1]))

    # A fire-free image with a faint blob: a false alarm only at thresholds up to 0.3.
    free = Item("/b.jpg", "fire-boxes", "b", 64, 64, (0.0, 0.0), (), True)
    maps = np.zeros((2, size, size), np.float32)
    maps[0, 0:4, 0:4] = 0.35
    scores.update(free, maps, np.array([0.5, 0.0]))

    # A masked frame 20 x 10 whose left half is fire; the map's left half is 0.7.
    mask = np.zeros((10, 20), np.uint8)
    mask[:, :10] = 255
    mask_path = tmp_path / "m.png"
    cv2.imwrite(str(mask_path), mask)
    frame = Item("/c.jpg", "fire-masks", "c", 20, 10, (1.0, UNKNOWN), mask_path=str(mask_path))
    maps = np.zeros((2, size, size), np.float32)
    maps[0, :, :16] = 0.7
    scores.update(frame, maps, np.array([0.9, 0.0]))

    assert scores.mask_scores(at[0.5]) == {"mIoU": pytest.approx(1.0), "fire_IoU": 1.0}
    assert scores.mask_scores(at[0.8])["fire_IoU"] == 0.0
    assert scores.mask_scores(at[0.8])["mIoU"] == pytest.approx(0.25)  # background 100 / 200

    boxes = scores.box_scores(at[0.5])
    assert boxes["AP50_fire"] == pytest.approx(1.0)
    assert math.isnan(boxes["AP50_smoke"]) and boxes["AP50"] == pytest.approx(1.0)
    assert scores.box_scores(at[0.6])["AP50_fire"] == 0.0
    # At 0.3 the false alarm outscores nothing (0.35 * 0.5 < 0.55 * 0.8): AP50 stays 1.
    assert scores.box_scores(at[0.3])["AP50_fire"] == pytest.approx(1.0)

    assert scores.fire_free == 1
    assert scores.false_alarm_rate(at[0.3]) == 1.0
    assert scores.false_alarm_rate(at[0.4]) == 0.0


def test_choose_prefers_best_then_lower_threshold():
    assert choose([0.1, 0.5, 0.5, 0.2]) == 1
    assert choose([math.nan, 0.0, math.nan]) == 1


def test_colour_grid_is_over_tau():
    assert [threshold_label("colour", t) for t in threshold_grid("colour")][3] == "tau=40"
    assert threshold_label("RS+EPM", 0.5) == "0.50"


def test_markdown_table_marks_missing_numbers():
    row = {
        "mask_threshold": "0.30",
        "mIoU": 0.5,
        "fire_IoU": 0.25,
        "box_threshold": "0.40",
        "AP50_fire": 0.125,
        "AP50_smoke": math.nan,
        "false_alarm_fire": 0.1,
        "fire_free_images": 10,
    }
    report = {
        "methods": {m: row for m in METHODS},
        "throughput_images_per_s": {"propose": 30.0, "propose_single_scale": 80.0, "GradCAM": 12.0},
        "config": {
            "image_size": 224,
            "arch": "resnet10",
            "eval_batch_size": 8,
            "scales": [1.0],
            "flip": False,
        },
        "device": "cpu",
        "training_seconds": 600.0,
        "total_seconds": 1200.0,
    }
    table = markdown_table(report)
    lines = table.splitlines()
    assert lines[2] == "| CAM | 50.0 | 25.0 | 12.5 | - | 10.0 | 0.30 | 0.40 |"
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(METHODS)
    assert "GradCAM 12.0 img/s" in table and "Training: 10.0 min" in table


@pytest.mark.shared_data
def test_real_data_split(shared_data):
    config = BenchConfig(data_dir=shared_data)
    data = load_bench_data(config)
    summary = data.summary
    # Every image is used once: training (fire-masks frames thinned) or held out.
    assert summary["fire-boxes"]["train"] + summary["fire-boxes"]["held_out"] == 760
    assert summary["fire-tags"]["train"] + summary["fire-tags"]["held_out"] == 454
    masks_train_frames = 902 - summary["fire-masks"]["held_out"]
    stride = config.mask_frame_stride
    assert summary["fire-masks"]["train"] == math.ceil(masks_train_frames / stride)
    for name, total in (("fire-boxes", 760), ("fire-masks", 902), ("fire-tags", 454)):
        assert 0.2 <= summary[name]["held_out"] / total <= 0.3
    train_groups = {(i.source, i.group) for i in data.train}
    assert not train_groups & {(i.source, i.group) for i in data.held_out}
    held_boxes = [i for i in data.held_out if i.source == "fire-boxes"]
    assert any(i.tags == (1.0, 0.0) for i in held_boxes)
    assert any(i.tags == (0.0, 1.0) for i in held_boxes)
    assert any(i.tags == (0.0, 0.0) for i in held_boxes)
    assert all(i.mask_path for i in data.threshold_masks)
    assert not {i.path for i in data.threshold_masks + data.threshold_boxes} & {
        i.path for i in data.held_out
    }
