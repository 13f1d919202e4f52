"""A small distillation run used by the kill-and-resume test: python _resumable.py OUT_DIR [--slow] [--resume]."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import blobs, mlp  # noqa: E402
from distill.config import LossConfig, TrainConfig  # noqa: E402
from distill.evaluate import accuracy, predict  # noqa: E402
from distill.progress import NullReporter  # noqa: E402
from distill.teachers import LocalTeacher  # noqa: E402
from distill.train import train  # noqa: E402


class Slow(NullReporter):
    def advance(self, steps: int = 1, **metrics: float) -> None:
        time.sleep(0.004)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    data, test = blobs(1200, seed=1), blobs(300, seed=2)
    teacher = LocalTeacher(mlp(seed=5, width=32), 4)
    torch.manual_seed(11)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
    result = train(
        student,
        data,
        TrainConfig(epochs=12, batch_size=32, lr=1e-2, checkpoint_every=7, seed=3),
        teacher=teacher,
        loss=LossConfig(temperature=2.0, alpha=0.5),
        evaluate=lambda m: {"test_accuracy": accuracy(predict(m, test.inputs), test.labels)},
        checkpoint_dir=out / "ckpt",
        resume="--resume" in sys.argv,
        reporter=Slow() if "--slow" in sys.argv else NullReporter(),
    )
    weights = {k: v.tolist() for k, v in result.model.state_dict().items()}
    (out / "result.json").write_text(json.dumps({"history": result.history, "weights": weights, "steps": result.steps}))


if __name__ == "__main__":
    main()
