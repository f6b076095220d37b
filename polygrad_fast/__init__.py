"""polygrad_fast: fast policy-guided trajectory diffusion world models (PolyGRAD)."""
import torch  # noqa: F401  (must be imported before any torch-linked native module)

__version__ = "0.1.0"
