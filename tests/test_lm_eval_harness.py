"""lm-evaluation-harness against `distill serve` (issue 14): its `local-completions` model, which sends token-id
prompts and scores them with `echo`, `logprobs` and one generated token, runs a multiple-choice task, a
rolling-loglikelihood (perplexity) task and a generate-until task, all on local data, and its scores equal those of
the harness's own Hugging Face backend on the same model.

The harness runs in a subprocess (offline, its dataset cache in the test's folder); the server runs in this one, on
loopback. A tiny GPT-2 with a byte-level BPE tokenizer trained here stands in for a real model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from distill.serve import serve_in_thread

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("the movie was", ["good", "bad", "a dog"], 0),
    ("i love this film , it is", ["great", "the worst", "boring and slow"], 0),
    ("the dog runs in the", ["street", "car", "year of the cat"], 0),
    ("the acting was", ["not good", "fun", "really very dull"], 1),
]
TEXTS = [
    "the movie was great and the acting was good.",
    "a man plays the guitar while a woman is riding a horse in the street.",
    " ".join(["the dog runs fast and the cat is eating food, it is a happy story of one year."] * 6),  # 2+ windows
]
PROMPTS = [("q: the movie was a: ", "good"), ("q: i love a: ", "fun"), ("q: the dog a: ", "runs")]


def tiny_bpe_gpt2(directory) -> None:
    """A random 2-layer GPT-2 (context 64) with a byte-level BPE tokenizer of about 400 tokens, trained here on the
    tasks' words (GPT-2's own scheme: a space belongs to the token after it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = TEXTS + [q + " " + " ".join(c) for q, c, _ in QUESTIONS] + [p + a for p, a in PROMPTS]
    core.train_from_iterator(corpus * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    end = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=end, eos_token_id=end
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_tasks(folder) -> list[str]:
    """Three task YAMLs over local JSONL files in `folder`; their names."""
    rows = {
        "mc": [{"question": q, "choices": c, "label": label} for q, c, label in QUESTIONS],
        "ppl": [{"text": text} for text in TEXTS],
        "gen": [{"question": p, "answer": a} for p, a in PROMPTS],
    }
    kinds = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: choices\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n",
        "ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        "gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    }
    names = []
    for kind, docs in rows.items():
        data = folder / f"{kind}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        name = f"distill_tiny_{kind}"
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (folder / f"{kind}.yaml").write_text(head + kinds[kind])
        names.append(name)
    return names


EVALUATE = textwrap.dedent(
    """
    import json, sys
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks_dir, model_dir, base, out = sys.argv[1:5]
    tasks = ["distill_tiny_mc", "distill_tiny_ppl", "distill_tiny_gen"]
    backends = {
        "served": ("local-completions", {
            "model": "tiny", "base_url": base + "/completions", "tokenizer": model_dir, "max_length": 64,
            "tokenized_requests": True, "max_retries": 1, "timeout": 60,
        }),
        "hf": ("hf", {"pretrained": model_dir, "device": "cpu", "dtype": "float32", "max_length": 62}),
    }
    found = {}
    for name, (model, args) in backends.items():
        results = simple_evaluate(
            model=model, model_args=args, tasks=tasks, batch_size=4, log_samples=True,
            task_manager=TaskManager(include_path=tasks_dir), bootstrap_iters=0,
        )
        found[name] = {
            task: [{"resps": s["resps"], "filtered_resps": s["filtered_resps"]} for s in samples]
            for task, samples in results["samples"].items()
        }
        found[name]["results"] = results["results"]
    with open(out, "w") as f:
        json.dump(found, f)
    """
)


def test_lm_eval_local_completions_scores_equal_its_hugging_face_backend(tmp_path):
    model_dir, tasks = tmp_path / "tiny", tmp_path / "tasks"
    tasks.mkdir()
    tiny_bpe_gpt2(model_dir)
    names = write_tasks(tasks)
    env = os.environ | {
        "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }  # fmt: skip
    out = tmp_path / "found.json"
    with serve_in_thread(model_dir, model_name="tiny", batch_wait_ms=1) as base:
        run = subprocess.run(
            [sys.executable, "-c", EVALUATE, str(tasks), str(model_dir), base, str(out)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(out.read_text())
    served, hf = found["served"], found["hf"]
    for name in names:
        assert len(served[name]) == len(hf[name]) > 0, name
    mc, ppl, gen = (f"distill_tiny_{kind}" for kind in ("mc", "ppl", "gen"))
    for mine, theirs in zip(served[mc], hf[mc]):  # per choice: [[loglikelihood, is_greedy]]
        assert len(mine["resps"]) == len(theirs["resps"]) == 3
        for (a,), (b,) in zip(mine["resps"], theirs["resps"]):
            assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    for mine, theirs in zip(served[ppl], hf[ppl]):  # the text's summed log-likelihood
        assert mine["resps"][0][0] == pytest.approx(theirs["resps"][0][0], abs=1e-4)
    assert served[ppl] != [] and served["results"][ppl]["word_perplexity,none"] == pytest.approx(
        hf["results"][ppl]["word_perplexity,none"], rel=1e-4
    )
    assert [s["filtered_resps"] for s in served[gen]] == [s["filtered_resps"] for s in hf[gen]]  # greedy, same text
