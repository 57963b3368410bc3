"""Exporting a detector to ONNX for edge devices.

What is exported is the network with input normalisation, the box decoding and the score
formula inside, and without score thresholding, top-k and non-maximum suppression: those are
data-dependent loops and sorts that ONNX exporters handle poorly, and edge runtimes usually have
their own NMS.

Graph (all float32; S = image_size; A = sum over levels P3..P7 of H_l * W_l, levels in that
order, positions row-major within a level):

    input  "images"  (N, 3, S, S) RGB in [0, 1]; resize the longer side to S and pad the rest
                     (right and bottom) with any colour
    output "boxes"   (N, A, 4) x1y1x2y2 in input pixels, clipped to the image
    output "scores"  (N, A, K) per-class score sqrt(sigmoid(class logit) * sigmoid(centre-ness))

On the device: keep (position, class) pairs with score above a threshold (the PyTorch model
uses 0.05), run NMS per class at IoU 0.6, keep the best 100. `decode_outputs` does this in
PyTorch, to check a device's decoder against.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms

from core.detectors import image_size_of
from core.distributed import unwrap

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("boxes", "scores")


class RawFCOS(nn.Module):
    """FCOS without resizing, thresholds and NMS: images (N, 3, S, S) in [0, 1] ->
    boxes (N, A, 4) x1y1x2y2 input pixels, scores (N, A, K); see the module docstring."""

    def __init__(self, model: FCOS, image_size: int) -> None:
        super().__init__()
        self.model = unwrap(model)
        mean = torch.tensor(self.model.transform.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.model.transform.image_std).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.image_size = image_size
        anchors = self._anchors(image_size)
        # Anchor centres (A, 2) and sizes (A, 2): FCOS regresses distances in anchor sizes.
        self.register_buffer("centres", (anchors[:, :2] + anchors[:, 2:]) / 2, persistent=False)
        self.register_buffer("sizes", anchors[:, 2:] - anchors[:, :2], persistent=False)

    @torch.no_grad()
    def _anchors(self, image_size: int) -> Tensor:
        """(A, 4) anchor boxes of one S x S image; they depend only on S."""
        probe = torch.zeros(1, 3, image_size, image_size)
        features = list(self.model.backbone(probe).values())
        image_list = ImageList(probe, [(image_size, image_size)])
        return self.model.anchor_generator(image_list, features)[0]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        images = (images - self.mean) / self.std
        features = list(self.model.backbone(images).values())
        head = self.model.head(features)
        distances = head["bbox_regression"]  # (N, A, 4): left, top, right, bottom
        top_left = self.centres - distances[..., :2] * self.sizes
        bottom_right = self.centres + distances[..., 2:] * self.sizes
        boxes = torch.cat([top_left, bottom_right], dim=-1).clamp(0, self.image_size)
        scores = torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"]))
        return boxes, scores


def export_detector_onnx(
    model: FCOS, path: str | Path, image_size: int | None = None, *, opset: int = 17
) -> Path:
    """Write `model` (an edge student, or any FCOS from build_detector) as ONNX to `path`.

    Args:
        model: FCOS (plain or DDP-wrapped); it is not modified.
        path: the .onnx file to write.
        image_size: S of the square input; defaults to the size the model was trained at.
        opset: ONNX opset version.

    The batch dimension is dynamic; the spatial size is fixed at S because the anchor grid is
    baked in. Returns the path written.
    """
    size = image_size or image_size_of(model)
    if size % 32:
        # The detector pads its inputs to multiples of 32; other sizes would change the grid.
        raise ValueError(f"image_size must be a multiple of 32, got {size}")
    raw = RawFCOS(model, size).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, size, size)
    with torch.no_grad():
        torch.onnx.export(
            raw,
            (example,),
            str(path),
            input_names=["images"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "images": {0: "batch"},
                "boxes": {0: "batch"},
                "scores": {0: "batch"},
            },
            opset_version=opset,
            # The TorchScript-based exporter: the dynamo one needs onnxscript, which this
            # environment does not ship, and the raw network has no control flow to trace.
            dynamo=False,
        )
    log.info("exported %s at %dx%d to %s", getattr(model, "variant", "detector"), size, size, path)
    return path


@torch.no_grad()
def decode_outputs(
    boxes: Tensor,
    scores: Tensor,
    *,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.6,
    max_detections: int = 100,
) -> list[dict[str, Tensor]]:
    """Detections from the exported outputs: threshold, per-class NMS, best `max_detections`.

    Args:
        boxes: (N, A, 4) x1y1x2y2 input pixels; scores: (N, A, K), as exported (numpy arrays
            from onnxruntime work after torch.from_numpy).

    Returns:
        Per image {"boxes": (D, 4) x1y1x2y2 input pixels, "scores": (D,), "labels": (D,)},
        best first. torchvision's FCOS also caps candidates at 1000 per level before NMS, which
        only matters when more than that pass the threshold.
    """
    detections = []
    num_classes = scores.shape[-1]
    for image_boxes, image_scores in zip(boxes, scores, strict=True):
        flat = image_scores.flatten()
        keep = torch.where(flat > score_threshold)[0]
        anchor_index, labels = keep // num_classes, keep % num_classes
        candidates, candidate_scores = image_boxes[anchor_index], flat[keep]
        kept = batched_nms(candidates, candidate_scores, labels, iou_threshold)[:max_detections]
        detections.append(
            {"boxes": candidates[kept], "scores": candidate_scores[kept], "labels": labels[kept]}
        )
    return detections


__all__ = ["OUTPUT_NAMES", "RawFCOS", "decode_outputs", "export_detector_onnx"]
