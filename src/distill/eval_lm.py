"""Task scores of language models with lm-evaluation-harness (the `eval` extra), and how much of the teacher's score
each student keeps.

Tasks are named the harness's way: any task it knows (its own, which fetch their data from the Hugging Face hub when
the machine is online), task files the user writes (`include`: a folder of the harness's YAML task files), and tasks
built here from local JSONL files (`LocalTask`), which need nothing from the network:

| kind         | rows of the JSONL file                              | harness output type     | metrics                      |
| ------------ | --------------------------------------------------- | ----------------------- | ---------------------------- |
| `choice`     | `query`, `choices` (strings), `gold` (an index)      | `multiple_choice`       | acc, acc_norm                |
| `perplexity` | `text`                                              | `loglikelihood_rolling` | word/byte perplexity, bits/byte |
| `answer`     | `question`, `answer` (the final answer, `#### x`)    | `generate_until`        | exact_match of the `#### x`  |

A model is a local folder (the harness's `hf` backend, on the CPU or `device`) or a model behind an OpenAI-compatible
endpoint (the harness's `local-completions`, which scores with `echo` + `logprobs`; `tokenizer` names a local
tokenizer folder of that model). Retention per task and metric is student / teacher where higher is better and
teacher / student where lower is (perplexity), so 100 % is always "as good as the teacher".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from distill.errors import DistillError

Kind = Literal["choice", "perplexity", "answer"]
ANSWER_PATTERN = r"#### (\-?[0-9\.\,]+)"
FIELDS: dict[str, tuple[str, ...]] = {"choice": ("query", "choices", "gold"), "perplexity": ("text",),
                                      "answer": ("question", "answer")}  # fmt: skip


@dataclass(frozen=True)
class LocalTask:
    """A task built from a local JSONL file (see the module docstring for the fields of each kind)."""

    name: str
    kind: Kind
    data: Path
    prompt: str = "{question}\n"  # `answer` tasks: how a question is asked (the model's training format)
    max_gen_toks: int = 128  # `answer` tasks: tokens generated at most


@dataclass(frozen=True)
class Model:
    """A model to score: a local folder, or a model behind an OpenAI-compatible endpoint (with a local tokenizer)."""

    path: Path | None = None
    base_url: str | None = None
    name: str | None = None
    tokenizer: Path | None = None

    def harness(self, device: str, batch_size: int) -> tuple[str, dict[str, Any]]:
        """The harness's model type and arguments."""
        if self.path is not None:
            return "hf", {"pretrained": str(self.path), "device": device, "dtype": "float32", "batch_size": batch_size}
        if not (self.base_url and self.name and self.tokenizer):
            raise DistillError("a served model needs its base URL, its model name and a local tokenizer folder")
        url = self.base_url.rstrip("/") + "/completions"
        return "local-completions", {"model": self.name, "base_url": url, "tokenizer": str(self.tokenizer),
                                     "tokenizer_backend": "huggingface", "tokenized_requests": True,
                                     "batch_size": batch_size, "num_concurrent": 4}  # fmt: skip


def _harness() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise DistillError("task evaluation needs lm-evaluation-harness: pip install 'distill[eval]'") from None
    return lm_eval


def _rows(path: Path, kind: Kind) -> list[dict[str, Any]]:
    from distill.data import json_lines

    rows = []
    for where, row in json_lines(path):
        missing = [f for f in FIELDS[kind] if not isinstance(row, dict) or f not in row]
        if missing:
            raise DistillError(f"{where}: a {kind} task row needs {', '.join(FIELDS[kind])} (missing {missing[0]})")
        rows.append(row)
    if not rows:
        raise DistillError(f"{path} has no rows for the {kind} task")
    return rows


def _metric(name: str, aggregation: str, higher_is_better: bool) -> dict[str, Any]:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def _config(task: LocalTask, data: Path) -> dict[str, Any]:
    """The harness's task config of a local task over `data` (its rows checked and rewritten by `write_tasks`)."""
    common = {"task": task.name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test"}  # fmt: skip
    if task.kind == "choice":
        return common | {"output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}",
                         "doc_to_target": "{{gold}}", "target_delimiter": " ",
                         "metric_list": [_metric("acc", "mean", True), _metric("acc_norm", "mean", True)]}  # fmt: skip
    if task.kind == "perplexity":
        return common | {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                         "metric_list": [_metric("word_perplexity", "weighted_perplexity", False),
                                         _metric("byte_perplexity", "weighted_perplexity", False),
                                         _metric("bits_per_byte", "bits_per_byte", False)]}  # fmt: skip
    until = {"until": ["\n\n"], "max_gen_toks": task.max_gen_toks, "do_sample": False, "temperature": 0.0}
    extract = [{"function": "regex", "regex_pattern": ANSWER_PATTERN}, {"function": "take_first"}]
    return common | {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{gold}}",
                     "target_delimiter": "", "generation_kwargs": until,
                     "filter_list": [{"name": "answer", "filter": extract}],
                     "metric_list": [_metric("exact_match", "mean", True) | {"ignore_case": True}]}  # fmt: skip


def _ask(template: str, question: str) -> str:
    """The template with `{question}` replaced (plain replacement: other braces stay)."""
    return template.replace("{question}", question.strip())


def _gold(answer: str) -> str:
    """The final answer of a worked solution (`... #### 42` -> `42`), or the answer as it is."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def write_tasks(tasks: Sequence[LocalTask], folder: Path) -> Path:
    """The harness's YAML task files (and their data, with the fields the configs read) for `tasks`, in `folder`;
    returns the folder, the `include` path of the harness's TaskManager."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        rows = _rows(task.data, task.kind)
        if task.kind == "answer":
            rows = [
                {"prompt": task.prompt.format(question=r["question"]), "gold": _gold(str(r["answer"]))} for r in rows
            ]
        data = folder / f"{task.name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        (folder / f"{task.name}.yaml").write_text(yaml.safe_dump(_config(task, data.resolve()), sort_keys=False))
    return folder


def scores(
    model: Model,
    tasks: Sequence[str],
    include: Path | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    num_fewshot: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Every task's metrics for `model`: {task: {metric: value, ...}} and, under "_higher_is_better", which way each
    metric points; a DistillError naming the task when the harness does not know it."""
    lm_eval = _harness()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include) if include is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DistillError(f"lm-evaluation-harness knows no task {unknown[0]!r}; write it in a task file (--include)")
    kind, arguments = model.harness(device, batch_size)
    batch = arguments.pop("batch_size")
    results = lm_eval.simple_evaluate(model=kind, model_args=arguments, tasks=list(tasks), task_manager=manager,
                                      limit=limit, batch_size=batch, num_fewshot=num_fewshot, log_samples=False)  # fmt: skip
    return {task: _metrics(results["results"][task], results["higher_is_better"].get(task, {})) for task in tasks}


def _metrics(raw: dict[str, Any], higher: dict[str, bool]) -> dict[str, Any]:
    """The harness's `metric,filter` entries as {metric: value} (stderr and bookkeeping left out)."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        metric, _, _ = key.partition(",")
        if "," in key and not metric.endswith("_stderr") and isinstance(value, (int, float)) and math.isfinite(value):
            values[metric] = float(value)
    return values | {"_higher_is_better": {m: bool(higher.get(m, True)) for m in values}}


def retention(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per task and metric, the share of the teacher's score the student keeps (None where the teacher's is 0)."""
    kept: dict[str, dict[str, float | None]] = {}
    for task, metrics in teacher.items():
        higher = metrics.get("_higher_is_better", {})
        kept[task] = {}
        for metric, value in metrics.items():
            if metric.startswith("_") or metric not in student.get(task, {}):
                continue
            mine = student[task][metric]
            ratio = (mine / value if value else None) if higher.get(metric, True) else (value / mine if mine else None)
            kept[task][metric] = ratio
    return kept


def compare(by_model: dict[str, dict[str, Any]], teacher: str = "teacher") -> dict[str, Any]:
    """Every model's task scores, and each student's retention against `teacher`: what reports and metrics.json
    keep."""
    return {
        "scores": by_model,
        "retention": {name: retention(by_model[teacher], s) for name, s in by_model.items() if name != teacher},
        "teacher": teacher,
    }


def summary(evaluation: dict[str, Any]) -> list[str]:
    """One line per student and task: how much of the teacher's first metric it keeps."""
    lines = []
    for student, tasks in evaluation["retention"].items():
        for task, kept in tasks.items():
            metric = next(iter(kept), None)
            if metric is None:
                continue
            share = "–" if kept[metric] is None else f"{100 * kept[metric]:.1f} %"
            lines.append(f"{student} keeps **{share}** of the teacher's {metric} on {task}.")
    return lines
