"""Deployment across machines: TLS material, SuperNode auth keys, and a local harness.

`certs` makes the CA and the SuperLink certificate, `node_keys` the SuperNode authentication
keys, `cli` the `fedstack certs` / `fedstack supernode-keys` commands, and `local` a one-machine
deployment (SuperLink + N SuperNodes as real processes) used by the tests and benchmarks.
"""
