"""Runs and published models, as the jobs write them and operators
read them: the layout of runs and models, ``ModelRef`` and publishing
(:mod:`~xfer.registry.layout`), what state a run is in (:mod:`~xfer.registry.runstatus`),
the index `xfer runs list` reads (:mod:`~xfer.registry.runindex`), the `xfer runs`
commands and their flags (:mod:`~xfer.registry.runs`, :mod:`~xfer.registry.cli`), two models compared on the same images
(:mod:`~xfer.registry.paired`) and which code a process runs
(:mod:`~xfer.registry.provenance`).
"""
