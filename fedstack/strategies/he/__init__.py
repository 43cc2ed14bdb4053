"""CKKS homomorphic-encryption averaging (`aggregation=he`).

Primitives without Flower: presets, keys, ckks (encrypt / validated sum / verified decrypt),
prg_form (the seeded uplink form), rns_add (the limb-wise sum), seal_io / seal_native /
seal_prng (SEAL's byte formats, its zstd and BLAKE2xb, its seed expansion), errors,
group_test (finding a bad reply by testing sums of groups of replies).
Flower glue: records, messages (the keys and codes server and clients share), strategy
(HEFedAvg), mod (he_mod), provisioning, cli. Nothing is imported
here so that `import fedstack.strategies.he.presets` stays light.
"""
