"""What people look at rather than read: the run report and its plots
(:mod:`~xfer.reports.report`, :mod:`~xfer.reports.plots`), and the nightly report with
a night's figures streamed from its files (:mod:`~xfer.reports.nightly`,
:mod:`~xfer.reports.nightstats`). Reports come after a commit: failing to write one
never undoes the outputs it describes.
"""
