"""Run under torchrun: a distillation on two processes (gloo, CPU). python -m torch.distributed.run --standalone
--nproc-per-node 2 _ddp_script.py OUT_DIR [--resume] [--accumulate N]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import blobs, mlp  # noqa: E402
from distill import distributed  # noqa: E402
from distill.config import LossConfig, TrainConfig  # noqa: E402
from distill.evaluate import accuracy, predict  # noqa: E402
from distill.teachers import LocalTeacher  # noqa: E402
from distill.train import train  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    assert distributed.join_torchrun() == 2  # gloo: the test machine has no GPU
    torch.set_num_threads(1)
    rank = distributed.rank()
    data, test = blobs(1000, seed=1), blobs(300, seed=2)
    teacher_model = mlp(seed=5, width=32)
    train(teacher_model, data, TrainConfig(epochs=3, batch_size=32, lr=1e-2, checkpoint_every=0))
    student = mlp(seed=11)
    accumulate = int(sys.argv[sys.argv.index("--accumulate") + 1]) if "--accumulate" in sys.argv else 1
    result = train(
        student,
        data,
        TrainConfig(epochs=4, batch_size=25, grad_accum_steps=accumulate, lr=1e-2, checkpoint_every=5, seed=3),
        teacher=LocalTeacher(teacher_model, 4),
        loss=LossConfig(temperature=2.0, alpha=0.5),
        evaluate=lambda m: {"test_accuracy": accuracy(predict(m, test.inputs), test.labels)},
        checkpoint_dir=out / "ckpt",
        resume="--resume" in sys.argv,
    )
    weights = torch.cat([p.detach().flatten() for p in result.model.parameters()]).tolist()
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {"history": result.history, "weights": weights, "steps": result.steps, "world": distributed.world_size()}
        )
    )
    distributed.leave()  # both processes past their last collective before the group goes


if __name__ == "__main__":
    main()
