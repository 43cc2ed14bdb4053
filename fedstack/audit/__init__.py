"""Attacks on what the server really saw (recorded in audit mode) and on the final model.

`inversion` reconstructs a client's training examples from its update (Geiping et al. 2020),
`membership` and `one_run` test membership and audit DP empirically, `runner` is
`fedstack audit RUN_DIR`. The package imports nothing heavy at import time: the run config
(`settings`) is validated in every process.
"""
