"""CKKS homomorphic-encryption averaging (`aggregation=he`).

Primitives without Flower: presets, keys, ckks (encrypt / validated sum / verified decrypt),
seal_io, group_test (finding a bad reply by testing sums of groups of replies).
Flower glue: records, messages (the keys and codes server and clients share), strategy
(HEFedAvg), mod (he_mod), provisioning, cli. Nothing is imported
here so that `import fedstack.strategies.he.presets` stays light.
"""
