"""Fused Triton kernels of the guided reverse step and of training-time noising, one op per module.

Each op has the signature of its torch version in ``polygrad_fast.step_ops`` plus optional in-kernel Philox noise
(``seed``; the row-level ops also take the ``step`` index for the noise counter). Importing this
package decorates the kernels: to run them under the Triton interpreter (no GPU), set ``TRITON_INTERPRET=1``
before the first import.
"""
from .guided_action_update import action_update_at
from .guided_state_update import state_update_at
from .q_sample import q_sample

__all__ = ["state_update_at", "action_update_at", "q_sample"]
