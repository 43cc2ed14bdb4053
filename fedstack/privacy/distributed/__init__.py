"""``dp=distributed``: client-level DP whose noise the clients add inside secure aggregation.

Primitives (no Flower import): :mod:`.rotation` (randomized Walsh-Hadamard with public
signs), :mod:`.rounding` (conditional randomized rounding with an explicit norm bound),
:mod:`.skellam` (Skellam noise from AES-256-CTR, its tail bound), :mod:`.mechanism` (scale,
sensitivities, noise per client, dropout slack, wrap check), :mod:`.accountant` (Skellam
RDP and epsilon). :mod:`.codec` plugs them into secure aggregation's input-codec seam.
See docs/dp.md, section "distributed".
"""
