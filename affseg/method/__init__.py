"""The method as a frozen teacher and trained students (SPEC §5.2).

    data batch ─► Teacher (frozen encoder, zero-shot classifier, Grad-CAM, encoder affinities)
                     │ TeacherOutput: features, CAMs, affinities — computed once, shared
                     ├─► Student (decoder) ─► logits, A_f ──┐
                     └─► PseudoLabeler (refinement settings) ◄┘ ─► pseudo-labels ─► losses

Modules take plain arguments; only the builders in `affseg.method.build` read a `Config`.
"""

from affseg.method.build import build_pseudo_labeler, build_student, build_teacher
from affseg.method.labeler import PseudoLabeler, Refinement, refine_together
from affseg.method.student import Student, StudentOutput
from affseg.method.teacher import Teacher, TeacherOutput

__all__ = [
    "PseudoLabeler",
    "Refinement",
    "Student",
    "StudentOutput",
    "Teacher",
    "TeacherOutput",
    "build_pseudo_labeler",
    "build_student",
    "build_teacher",
    "refine_together",
]
