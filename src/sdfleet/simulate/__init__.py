"""``sdfleet simulate``: a discrete-event model of a fleet, to plan it before paying for it.

The pieces, one module each: ``trace`` (arrivals), ``route`` (the real filter engine), ``queue``
(visibility, redelivery, dead letters), ``agent`` (a replica's stages, exact mode) and ``pool``
(a queue's replicas as a fluid, aggregate mode), ``schedule`` (a GPU's calls), ``keda`` (KEDA's and
the HPA's rule), ``cluster`` (Karpenter's nodes, spot interruptions), ``fleet`` (pods of a
Deployment), ``perf`` (GPU table), ``pricing``, ``engine`` (the clock), ``report``, ``plots``,
``sweep``. Needs the ``simulate`` extra (simpy, numpy, matplotlib). See docs/simulate.md.
"""
