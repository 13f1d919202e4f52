"""LoRA students (Hu et al. 2021) through `peft`: the student's chosen linear layers keep their weights W frozen and
learn a low-rank update, W + (alpha / r) B A with A (r, in) and B (out, r), so only the adapters are trained.

`with_lora` wraps a loaded causal LM (peft's `get_peft_model`). peft injects the adapters into the model's own
modules, so the training loop is given the model itself (`trained_model`): a plain Hugging Face causal LM whose
only trainable parameters are the adapters, on which the chunked loss (its base model and output head, reached by
`base_model_prefix`), `generate` for on-policy samples, DDP and checkpoints work as on any student. (Reached through
the peft wrapper instead, `base_model_prefix` "model", as Llama's, would name the whole causal LM.)
`save_lora_student` writes the adapter (`adapter/`, peft's format, loadable with `PeftModel.from_pretrained`) and
the merged model (W + (alpha / r) B A as plain weights) as an ordinary `AutoModelForCausalLM` folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.config import LoraSpec
from distill.errors import DistillError

ADAPTER = "adapter"  # the adapter's folder inside the saved student


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise DistillError("LoRA students need peft, in the hf extra: pip install 'distill[hf]'") from None
    return peft


def with_lora(model: nn.Module, spec: LoraSpec, *, seed: int = 0) -> Any:
    """`model` (a causal LM) with LoRA adapters on `spec.target_modules`, everything else frozen: a peft model.
    The adapters' initial A is drawn from a generator fixed by `seed` (B starts at zero: the wrapped model computes
    what `model` did)."""
    peft = _peft()
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    config = peft.LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: peft sets it itself
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks transformers' old name
        try:
            return peft.get_peft_model(model, config)
        except ValueError as error:  # peft's words for target modules that the model does not have
            names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)})
            raise DistillError(
                f"student.lora.target_modules: {str(error).rstrip('.')}; the student's linear layers are named "
                f"{', '.join(names)} (or give all-linear)"
            ) from None


def trained_model(lora_model: Any) -> nn.Module:
    """The model inside a peft model, its adapters injected: what the training loop trains."""
    model: nn.Module = lora_model.get_base_model()
    return model


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear layers are Conv1D


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trainable": parameters the optimizer updates, "total": all parameters (each shared tensor once)}."""
    unique = {id(p): p for p in model.parameters()}.values()
    return {"trainable": sum(p.numel() for p in unique if p.requires_grad), "total": sum(p.numel() for p in unique)}


def save_lora_student(model: Any, directory: Path, tokenizer: Any) -> nn.Module:
    """Save a trained peft model: its adapter into `directory/adapter` and the merged model (with `tokenizer`) into
    `directory`, which `AutoModelForCausalLM.from_pretrained` then loads. Returns the merged model; `model` is
    merged in place (it is no longer a LoRA model after this)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / ADAPTER)
    merged: nn.Module = model.merge_and_unload()
    merged.save_pretrained(directory)  # type: ignore[operator]
    tokenizer.save_pretrained(directory)
    return merged
