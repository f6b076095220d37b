"""Fused Triton kernels of the guided reverse step and of training-time noising, one op per module.

Each public function has the signature of its twin in ``polygrad_fast.reference.step_ops`` plus an optional
``seed`` for in-kernel Philox noise. Importing this package decorates the kernels: to run them under the Triton
interpreter (no GPU), set ``TRITON_INTERPRET=1`` before the first import.
"""
from .guided_action_update import guided_action_update
from .guided_state_update import guided_state_update
from .q_sample import q_sample

__all__ = ["guided_state_update", "guided_action_update", "q_sample"]
