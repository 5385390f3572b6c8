"""`xfer score`: a night of batch scoring. The night and its stages
(:mod:`~xfer.scoring.score`), its plan of blocks, staging and commit
(:mod:`~xfer.scoring.scoreplan`), the actor pool over its blocks
(:mod:`~xfer.scoring.scorepool`), the typed plan and job handed between them
(:mod:`~xfer.scoring.scorejob`), the actor that scores one block
(:mod:`~xfer.scoring.scorer`), the predictions' columns, which every writer and
reader imports (:mod:`~xfer.scoring.predictions`), one run per night
(:mod:`~xfer.scoring.scorelock`) and why a night stops before its commit
(:mod:`~xfer.scoring.nightguard`).
"""
