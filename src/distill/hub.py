"""Publishing a student: its folder (weights, tokenizer, model card) uploaded to a Hugging Face Hub repository with
`huggingface_hub`, to huggingface.co or to any endpoint that speaks its API (a private Hub, a mirror)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.model_card import CARD, student_folders

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "model.json")


def student_of(run: Path, name: str | None = None) -> Path:
    """The student folder of a run to publish: `name` inside it, else its `student/`, else its only student."""
    if name is not None:
        folder = run / name
    else:
        found = student_folders(run)
        folder = run / "student" if (run / "student").is_dir() else (found[0] if len(found) == 1 else run / "model")
    if not folder.is_dir() or not any((folder / weights).is_file() for weights in WEIGHTS):
        choices = ", ".join(str(p.relative_to(run)) for p in student_folders(run)) or "none"
        raise DistillError(f"{folder} holds no saved model; name one with --folder (students in {run}: {choices})")
    return folder


def push(folder: Path, repo: str, *, token: str | None, endpoint: str | None = None, private: bool = False) -> str:
    """Create `repo` (a model repository, kept if it exists) and upload `folder` into it in one commit; the commit's
    URL. The folder's model card (README.md) becomes the repository's."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.errors import HTTPError as TransportError  # the HTTP library's own, whichever it uses
    except ImportError:
        raise DistillError("publishing needs huggingface_hub (the hf extra): pip install 'distill[hf]'") from None
    if not (folder / CARD).is_file():
        raise DistillError(f"{folder} has no model card ({CARD}); it was not saved by distill")
    api: Any = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=f"distill: {folder.name}")
    except HfHubHTTPError as error:
        first = str(error).splitlines()[0]
        raise DistillError(f"the Hub at {endpoint or 'huggingface.co'} refused the upload to {repo}: {first}") from None
    except (TransportError, OSError) as error:
        raise DistillError(f"cannot reach the Hub at {endpoint or 'huggingface.co'} ({type(error).__name__})") from None
    return str(getattr(commit, "commit_url", commit))
