"""`distill serve --teacher-url`: the options of an LM cascade turned into a `distill.serve.CascadeSetup`, and the
line that reports the threshold chosen on a validation file. The teacher's API key is read here, from the
environment variable `--teacher-key-env` names."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from distill import cascade_curve
from distill.cli.app import err
from distill.errors import DistillError

CASCADE_ONLY = ("teacher_model", "threshold", "validation", "target", "assurance", "confidence", "samples", "answers",
                "verify")  # fmt: skip


def announce(calibration: Any) -> None:
    """One line about the threshold chosen at start-up (stderr)."""
    choice = calibration.choice
    judged = "accuracy against the gold answers" if calibration.reference == "gold" else "agreement with the teacher"
    err.print(
        f"cascade: threshold {choice.threshold:.6g} chosen on {choice.rows} validation rows ({judged}): "
        f"{choice.escalation_rate:.1%} escalated, {choice.score:.1%} ({choice.relative:.1%} of the teacher's "
        f"{choice.teacher_score:.1%}; at least {choice.target:.1%} of it at {choice.assurance:.0%} confidence); "
        f"the student alone {choice.student_score:.1%}",
        markup=False,
        highlight=False,
    )


def cascade_setup(teacher_url: str | None, options: dict[str, Any]) -> Any:
    """The cascade `distill serve` was asked for (None without --teacher-url); DistillError for options that do not
    go together."""
    from distill.lm_confidence import ANSWERS, MEASURES, ConfidenceConfig
    from distill.serve import CascadeSetup, TeacherEndpoint

    if teacher_url is None:
        given = [name for name in CASCADE_ONLY if options.get(name) not in (None, False)]
        if given:
            raise DistillError(f"--{given[0].replace('_', '-')} is for a cascade: give the teacher's --teacher-url")
        return None
    if not options.get("teacher_model"):
        raise DistillError("--teacher-url needs --teacher-model, the teacher's model id at that endpoint")
    threshold, validation = options.get("threshold"), options.get("validation")
    if (threshold is None) == (validation is None):
        raise DistillError("a cascade needs --threshold T or --validation FILE (to choose it on), one of them")
    if options.get("confidence") not in (None, *MEASURES) or options.get("answers") not in (None, *ANSWERS):
        raise DistillError("--confidence takes logprob or agreement, --answers text or final")
    if options.get("verify") and options.get("answers") != "final":
        raise DistillError("--verify checks the final answer line '#### N': add --answers final")
    if threshold is not None and not math.isfinite(threshold):
        raise DistillError(f"--threshold must be a finite number, not {threshold}")
    assurance = options.get("assurance")
    if assurance is not None and not 0 < assurance < 1:
        raise DistillError(f"--assurance must lie strictly between 0 and 1, not {assurance}")
    if validation is not None and not Path(validation).is_file():
        raise DistillError(f"--validation {validation} is not a file")
    confidence = ConfidenceConfig(
        measure=options.get("confidence") or "logprob", samples=options.get("samples") or 5,
        answers=options.get("answers") or "text", verify=bool(options.get("verify")),
    )  # fmt: skip
    try:
        teacher = TeacherEndpoint(teacher_url, options["teacher_model"], os.environ.get(options["key_env"]) or None)
    except ValueError as error:
        raise DistillError(str(error)) from None
    return CascadeSetup(
        teacher=teacher, confidence=confidence, threshold=threshold, validation=validation,
        target=options.get("target") or 0.95, assurance=assurance or cascade_curve.ASSURANCE,
        max_tokens=options.get("validation_max_tokens") or 256, on_calibrated=announce,
    )  # fmt: skip
