"""Secure aggregation by double masking (Bonawitz et al. 2017; SecAgg+ graphs, Bell et al. 2020).

The protocol core imports nothing of Flower, so every dropout pattern runs fast in one
process: ``params`` (what both sides agree on), ``graph`` (neighbour graphs), ``messages`` and
``wire`` (stage messages and their flat encoding), ``statements`` (what members sign under
``security=malicious``), ``input_codec`` (updates <-> ring words), ``client`` (serialisable
client state and handlers), ``server`` (one round on the server), ``simulate`` (parties in
one process).
``strategy`` (server, Flower Message API) and ``mod`` (ClientApp mod) carry it over Flower;
import them explicitly. Protocol description: docs/secagg.md.
"""
