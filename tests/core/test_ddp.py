"""Two CPU processes under torchrun (gloo) train the same tiny detector as one process would.

Run by pytest, this file starts itself under `torch.distributed.run`; run as a script, it is
one rank's worker.
"""

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

CLASSES = ["fire", "smoke"]
CONFIG = dict(
    variant="tiny-student",
    epochs=1,
    batch_size=2,  # per process
    image_size=64,
    optimizer="sgd",
    momentum=0.0,
    weight_decay=0.0,
    lr=0.02,
    warmup_steps=0,
    grad_clip=0.0,
    augment=False,
    seed=3,
    device="cpu",
)


def _worker(samples_file: Path, out_dir: Path) -> None:
    import os

    from core.distributed import cleanup, init_distributed
    from core.train_detector import DetectorTrainConfig, train_detector

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    samples = _as_arrays(json.loads(samples_file.read_text()))
    reports = []
    result = train_detector(
        DetectorTrainConfig(**CONFIG),
        samples,
        CLASSES,
        checkpoint_path=out_dir / "ddp.pt",
        progress=reports.append,
    )
    torch.save(result.model.state_dict(), out_dir / f"rank{rank}.pt")
    (out_dir / f"rank{rank}.reports").write_text(str(len(reports)))
    cleanup(init_distributed())


def _write_samples(folder: Path, count: int = 8):
    rng = np.random.default_rng(0)
    samples = []
    for index in range(count):
        pixels = (rng.random((64, 64, 3)) * 50).astype(np.uint8)
        boxes, labels = [], []
        if index % 4 != 3:
            x1, y1 = int(rng.integers(0, 30)), int(rng.integers(0, 30))
            pixels[y1 : y1 + 30, x1 : x1 + 25] = 220
            boxes, labels = [[x1, y1, x1 + 25, y1 + 30]], [index % 2]
        path = folder / f"frame{index}.png"
        Image.fromarray(pixels).save(path)
        samples.append((str(path), boxes, labels))
    return samples


def _as_arrays(samples):
    return [
        (path, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64))
        for path, boxes, labels in samples
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference_training(samples):
    """One process doing what DDP does: each step, the mean of the two ranks' losses on their
    shards of the DistributedSampler order. (FCOS divides its losses by the number of positive
    locations in the batch, so that mean is not the loss of the merged batch.)"""
    from torch.utils.data import DistributedSampler

    from core.detection_data import DetectionDataset
    from core.detectors import build_detector, detector_forward
    from core.device import seed_everything

    seed_everything(CONFIG["seed"])
    model = build_detector("tiny-student", len(CLASSES), image_size=64).train()
    dataset = DetectionDataset(samples, 64)
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, 2, rank, shuffle=True, seed=CONFIG["seed"])
        sampler.set_epoch(0)
        shards.append(list(sampler))
    optimizer = torch.optim.SGD(model.parameters(), lr=CONFIG["lr"])
    lr_factors = [1.0, 0.5]  # cosine over two steps, no warm-up
    for step, factor in enumerate(lr_factors):
        for group in optimizer.param_groups:
            group["lr"] = CONFIG["lr"] * factor
        total = 0
        for shard in shards:
            batch = [dataset[i] for i in shard[step * 2 : step * 2 + 2]]
            losses = detector_forward(model, [b[0] for b in batch], [b[1] for b in batch]).losses
            total = total + sum(losses.values()) / 2
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.timeout(180)
def test_two_gloo_processes_train_the_same_model(tmp_path):
    samples = _write_samples(tmp_path)
    samples_file = tmp_path / "samples.json"
    samples_file.write_text(json.dumps(samples))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        __file__,
        "--samples",
        str(samples_file),
        "--out",
        str(tmp_path),
    ]
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stderr[-3000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    reference = _reference_training(_as_arrays(samples))
    initial = _initial_state()
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"{name} differs between ranks"
        assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(rank0[name], initial[name]) for name in rank0), "nothing trained"
    assert (tmp_path / "rank0.reports").read_text() == "2"  # two steps, reported by rank 0
    assert (tmp_path / "rank1.reports").read_text() == "0"
    assert torch.load(tmp_path / "ddp.pt", weights_only=True)["epoch"] == 1


def _initial_state():
    from core.detectors import build_detector
    from core.device import seed_everything

    seed_everything(CONFIG["seed"])
    return build_detector("tiny-student", len(CLASSES), image_size=64).state_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    _worker(arguments.samples, arguments.out)
