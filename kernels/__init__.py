"""Fused Triton kernels of the guided reverse step and of training-time noising, one op per module.

The row-level ops and ``q_sample`` have the signatures of their torch versions in ``polygrad_fast.step_ops``, the
step-t ops those of their paper-style twins in ``polygrad_fast.reference.step_ops``, each plus optional in-kernel
Philox noise (``seed``; the row-level ops also take the ``step`` index for the noise counter). Importing this
package decorates the kernels: to run them under the Triton interpreter (no GPU), set ``TRITON_INTERPRET=1``
before the first import.
"""
from .guided_action_update import action_update_at, guided_action_update
from .guided_state_update import guided_state_update, state_update_at
from .q_sample import q_sample

__all__ = ["guided_state_update", "state_update_at", "guided_action_update", "action_update_at", "q_sample"]
