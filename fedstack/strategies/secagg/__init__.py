"""Secure aggregation by double masking (Bonawitz et al. 2017; SecAgg+ graphs, Bell et al. 2020).

The protocol core (``params``, ``graph``, ``messages``, ``client``, ``server``, ``simulate``)
imports nothing of Flower so every dropout pattern runs fast in one process. ``strategy``
(server) and ``mod`` (client) carry it over Flower's Message API; import them explicitly.
"""
