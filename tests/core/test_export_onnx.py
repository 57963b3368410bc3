import numpy as np
import onnxruntime
import pytest
import torch
from torch.testing import assert_close

from core.detectors import build_detector
from core.export_onnx import RawFCOS, decode_outputs, export_detector_onnx


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_detector("tiny-student", num_classes=2, image_size=64).eval()
    # Random heads score everything near the 0.01 prior; a larger bias gives detections to NMS.
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(2.0)
    # No cap: which of two near-equal scores makes a cut of 100 may differ between runtimes.
    model.detections_per_img = 1000
    path = export_detector_onnx(model, tmp_path_factory.mktemp("onnx") / "edge.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model, session


@pytest.mark.parametrize("seed", [0, 1])
def test_onnxruntime_matches_pytorch(exported, seed):
    model, session = exported
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    boxes, scores = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected_boxes, expected_scores = RawFCOS(model, 64)(images)
    assert boxes.shape == (3, 8 * 8 + 4 * 4 + 2 * 2 + 1 + 1, 4)
    assert scores.shape == boxes.shape[:2] + (2,)
    assert_close(torch.from_numpy(boxes), expected_boxes, rtol=1e-4, atol=1e-3)
    assert_close(torch.from_numpy(scores), expected_scores, rtol=1e-4, atol=1e-5)


def test_decoded_onnx_outputs_match_the_pytorch_detector(exported):
    model, session = exported
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    boxes, scores = session.run(None, {"images": images.numpy()})
    decoded = decode_outputs(torch.from_numpy(boxes), torch.from_numpy(scores), max_detections=1000)
    with torch.no_grad():
        reference = model(list(images))
    for ours, theirs in zip(decoded, reference, strict=True):
        assert len(theirs["scores"]) > 0
        order = np.lexsort((theirs["labels"].numpy(), -theirs["scores"].numpy()))
        mine = np.lexsort((ours["labels"].numpy(), -ours["scores"].numpy()))
        assert_close(ours["scores"][mine], theirs["scores"][order], rtol=1e-4, atol=1e-5)
        assert_close(ours["boxes"][mine], theirs["boxes"][order], rtol=1e-4, atol=1e-3)
        assert torch.equal(ours["labels"][mine], theirs["labels"][order])


def test_export_refuses_sizes_off_the_grid(tmp_path):
    model = build_detector("tiny-student", 2, image_size=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        export_detector_onnx(model, tmp_path / "x.onnx", image_size=100)
