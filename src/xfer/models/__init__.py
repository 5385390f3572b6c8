"""The network and what travels with it: the bases a config may name
and their input scaling (:mod:`~xfer.models.bases`), pretrained weights fetched once
per machine (:mod:`~xfer.models.weights`), the model itself: base + head, freezing,
compiling (:mod:`~xfer.models.model`), temperature scaling
(:mod:`~xfer.models.calibration`) and the SavedModel export for serving without
xfer (:mod:`~xfer.models.export`).
"""
