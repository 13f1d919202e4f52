"""Model cards: every saved student gets a `README.md` in the Hugging Face format (YAML metadata, then markdown)
that carries its run's report: what was kept and what was saved (the report's tables: teacher vs student vs the
same student alone, retention, size, speed), the loss, the data and the whole config.

The metadata says what the Hub and `huggingface_hub.ModelCard` read: `library_name` (transformers for a Hugging Face
folder, distill for the built-in MLP/CNN), `pipeline_tag` where one applies, `base_model` (the model the student
started from or was distilled from, when it is a Hub name: a local folder means nothing to a reader of the Hub),
`tags` (knowledge-distillation, distill, the recipe, lora for a student trained through LoRA adapters).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from distill.report import Report, markdown_table

CARD = "README.md"
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # org/name
PIPELINES = {"lm": "text-generation", "reasoning": "text-generation", "train-lm": "text-generation",
             "sst2": "text-classification", "stsb": "sentence-similarity"}  # fmt: skip


def metadata(folder: Path, metrics: dict[str, Any], base_model: str | None) -> dict[str, Any]:
    """The card's YAML metadata for the student saved in `folder`."""
    recipe = str(metrics.get("recipe", "distill"))
    hugging_face = (folder / "config.json").is_file()
    data: dict[str, Any] = {
        "library_name": "transformers" if hugging_face else "distill",
        "tags": ["knowledge-distillation", "distill", recipe] + (["lora"] if metrics.get("adapter") else []),
    }
    if hugging_face and recipe in PIPELINES:
        data["pipeline_tag"] = PIPELINES[recipe]
    if base_model and HUB_NAME.match(base_model) and not Path(base_model).exists():
        data["base_model"] = base_model
    return data


def card(folder: Path, report: Report, config_yaml: str, metrics: dict[str, Any], base_model: str | None = None) -> str:
    """The model card's text: metadata, the report (summary and tables), the loss, the data and the config."""
    parts = ["---", yaml.safe_dump(metadata(folder, metrics, base_model), sort_keys=False).rstrip(), "---", ""]
    parts += [f"# {folder.name}: a student distilled by distill", "", report.description, ""]
    parts += [f"- {line}" for line in report.summary] + [""]
    for table in report.tables:
        parts += [f"## {table.title}", "", markdown_table(table), ""]
    loss = metrics.get("loss")
    if isinstance(loss, dict):
        parts += ["## Loss", "", _loss_line(loss), ""]
    parts += ["## Data", "", report.description or "See the config below.", ""]
    if report.notes:
        parts += ["## How it was measured", ""] + [f"- {note}" for note in report.notes] + [""]
    parts += ["## Config", "", "The resolved config of the run (`distill run --config` or a job's config):", ""]
    parts += ["```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(parts)


def _loss_line(loss: dict[str, Any]) -> str:
    alpha, temperature, divergence = loss.get("alpha"), loss.get("temperature"), loss.get("divergence")
    if alpha is None or temperature is None:
        return "See the config below."
    return (
        f"{alpha} x T^2 x {divergence}(teacher_T || student_T) + {1 - float(alpha):.2f} x CE(targets), "
        f"T = {temperature} (Hinton et al. 2015)."
    )


def write_cards(
    folders: list[Path], report: Report, config_yaml: str, metrics: dict[str, Any], base_model: str | None = None
) -> list[Path]:
    """A card in each student folder that exists; the cards written."""
    written = []
    for folder in folders:
        if folder.is_dir():
            (folder / CARD).write_text(card(folder, report, config_yaml, metrics, base_model), encoding="utf-8")
            written.append(folder / CARD)
    return written


def student_folders(output: Path) -> list[Path]:
    """The students a run saved: `student/` and every `models/student-*` and `students/*` folder."""
    found = [output / "student"] if (output / "student").is_dir() else []
    for parent, pattern in ((output / "models", "student*"), (output / "students", "*")):
        found += sorted(p for p in parent.glob(pattern) if p.is_dir()) if parent.is_dir() else []
    return found
