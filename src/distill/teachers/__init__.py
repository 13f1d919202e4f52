"""Teachers: anything that maps a batch to a `TeacherOutput` (`distill.teachers.protocol`).

Every kind of teacher (a local model, an ensemble, a cache of outputs on disk, a top-k token cache, a remote API)
returns the same `TeacherOutput`, so every loss works with every teacher.
"""

from __future__ import annotations

from distill.teachers.cached import CachedTeacher, build_cache
from distill.teachers.ensemble import EnsembleTeacher
from distill.teachers.local import LocalTeacher
from distill.teachers.protocol import Teacher, TeacherOutput

__all__ = ["CachedTeacher", "EnsembleTeacher", "LocalTeacher", "Teacher", "TeacherOutput", "build_cache"]
