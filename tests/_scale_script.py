"""Run under torchrun: a tiny GPT-2 distilled on two processes with the LLM-scale settings together (gloo, CPU).
python -m torch.distributed.run --standalone --nproc-per-node 2 _scale_script.py OUT_DIR STRATEGY"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_gpt2  # noqa: E402
from distill import distributed  # noqa: E402
from distill.config import LossConfig, TrainConfig  # noqa: E402
from distill.lm_data import Example, tokenize_examples  # noqa: E402
from distill.teachers.local import LocalTeacher  # noqa: E402
from distill.train import train  # noqa: E402

EXAMPLES = [
    Example("q : the dog runs", "a : the dog plays"),
    Example("q : a great movie", "a : best film of the year"),
    Example("", "the cat is happy and the dog is sad"),
    Example("q : bad food", "a : very bad"),
]


def main() -> None:
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    assert distributed.join_torchrun() == 2
    torch.set_num_threads(1)
    teacher, tokenizer = tiny_gpt2(layers=3, seed=2)
    student, _ = tiny_gpt2(seed=1)
    data = tokenize_examples(tokenizer, EXAMPLES * 6)  # 24 rows: groups of 2 x 2 rows, 3 per process an epoch
    config = TrainConfig(epochs=3, batch_size=2, grad_accum_steps=2, lr=1e-2, schedule="constant", warmup=0.0,
                         strategy=strategy, precision="bf16", teacher_precision="fp32",
                         activation_checkpointing=True, checkpoint_every=2)  # fmt: skip
    result = train(student, data, config, teacher=LocalTeacher(teacher, len(tokenizer)),
                   loss=LossConfig(alpha=0.5, chunk_size=8), checkpoint_dir=out / "ckpt")  # fmt: skip
    state = result.state_dict if result.state_dict is not None else result.model.state_dict()  # FSDP: rank 0's
    weights = [float(v.detach().float().norm()) for _, v in sorted(state.items())]
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps({"history": result.history, "steps": result.steps,
                                                                    "weights": weights}))  # fmt: skip
    distributed.leave()


if __name__ == "__main__":
    main()
