"""Images to datasets to tensors: where raw images come from
(:mod:`~xfer.data.inputs`), checking, normalising and decoding one image, the one home
of image preparation (:mod:`~xfer.data.images`; :mod:`~xfer.data.preprocess` adds
training's augmentation), sharding into Parquet with a manifest
(:mod:`~xfer.data.shard`, :mod:`~xfer.data.shardtasks`, :mod:`~xfer.data.manifest`),
the training reader and the row groups it streams (:mod:`~xfer.data.reader`,
:mod:`~xfer.data.readrows`, :mod:`~xfer.data.rowgroups`, the one row-group read the
reader, the feature cache and scoring share), the keys a run leaves out
(:mod:`~xfer.data.exclude`), the feature cache (:mod:`~xfer.data.features`,
:mod:`~xfer.data.featurebuild`) and generated image sets (:mod:`~xfer.data.synth`).
"""
