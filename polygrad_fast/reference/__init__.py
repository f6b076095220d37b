"""Paper-style reference implementations that every fast path is checked against.

Independent twins: they import torch, numpy and the plain data definitions (``schedule``, ``normalizer``) only,
never the fast path, the native extensions, the policy helpers or the production step ops; their noise is a
numpy twin of the native counter-based generator (``reference.noise``), or explicit.
"""
