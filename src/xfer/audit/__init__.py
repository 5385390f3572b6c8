"""`xfer audit DATASET`: duplicate images and suspected label errors.
Reading the shards, fingerprints and the base's features
(:mod:`~xfer.audit.collect.collect`), finding exact and near duplicates and label issues
(:mod:`~xfer.audit.collect.find`), writing the lists and the page (:mod:`~xfer.audit.collect.report`),
and the command's flags (:mod:`~xfer.audit.collect.cli`).
"""
