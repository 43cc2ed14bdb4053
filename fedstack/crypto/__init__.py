"""Cryptographic primitives for fedstack's privacy layers.

Nothing here imports Flower: each primitive is tested and benchmarked alone, and the
secure-aggregation protocol core composes them. All secret randomness comes from the
operating system (``os.urandom``/``secrets``), never from ``random`` or NumPy generators.
"""
