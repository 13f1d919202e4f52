"""distill: knowledge distillation that proves what was kept and what was saved.

import distill
result = distill.distill(teacher, student, (x, y), transfer=x_unlabeled, test=(x_test, y_test))
"""

from distill.api import distill
from distill.errors import DistillError

__version__ = "0.1.0"
__all__ = ["DistillError", "distill", "__version__"]
