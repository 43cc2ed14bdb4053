"""CKKS homomorphic-encryption averaging (`aggregation=he`).

Primitives without Flower: presets, keys, ckks (encrypt / validated sum / decrypt), seal_io.
Flower glue: records, strategy (HEFedAvg), mod (he_mod), provisioning, cli. Nothing is imported
here so that `import fedstack.strategies.he.presets` stays light.
"""
