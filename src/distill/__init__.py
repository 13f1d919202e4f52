"""distill: knowledge distillation that proves what was kept and what was saved.

import distill
result = distill.distill(teacher, student, (x, y), transfer=x_unlabeled, test=(x_test, y_test))

`distill.distill` is imported on first use, so that `import distill.<module>` (the CLI's, the service's) does not
load torch before it needs it.
"""

from typing import Any

from distill.errors import DistillError

__version__ = "0.1.0"
__all__ = ["DistillError", "distill", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "distill":
        from distill.api import distill

        return distill
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
