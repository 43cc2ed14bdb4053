"""Differential privacy for fedstack clients (`dp=local`) and the server's privacy ledger.

Modules, one concept each:

- settings: `LocalDPSettings`, the schema of conf/dp/local.yaml
- calibration: sample rate, δ default, σ from a target ε (Opacus's search)
- schedule: the run-wide public schedule (δ, q, steps, σ) under secagg/he, so that nothing a
  client reports in the clear depends on its n_k; the ledger checks replies against it
- accountant_state: `PrivacyState`, the accountant history that survives processes
- budget: the before-training budget check and node-level tightening
- poisson: Poisson-sampled batches from a secret generator
- bookkeeping: one-backward per-sample clipping (book-keeping, Bu et al. 2023)
- model_check: what DP-SGD cannot clip (tied weights, layers mixing examples, running
  statistics), refused naming the layer; standard fixes
- engine: `LocalDP`, the public per-client per-round entry point (Opacus-style)
- trainer: `DPTrainer`, the task's LocalTrainer with DP-SGD
- local_trainer: Flower glue (context.state, node config), the ClientApp's hook
- ledger, report: server-side `PrivacyLedger`, privacy.json / privacy_report.md / epsilon.png
- clear_view: what the server receives in the clear under each stack (for the report)
- ledger_sync: what the ledger and a client tell each other (records, reconciliation,
  identity query)

Nothing is imported here, so importing the server-side ledger never pulls in Opacus.
"""
