"""The object store: what a URI is, S3 clients and pyarrow's filesystem
(:mod:`~xfer.store.s3`), reading, writing, listing and copying by URI
(:mod:`~xfer.store.storage`, :mod:`~xfer.store.listing`, :mod:`~xfer.store.inventory`),
committing a set of objects so a reader never sees half of them
(:mod:`~xfer.store.commit`), riding out a store that is away for a while
(:mod:`~xfer.store.retry`), whether a setting names a thing or gives its URI
(:mod:`~xfer.store.uris`), and the embedded S3 server for local mode and tests
(:mod:`~xfer.store.s3server`). Nothing here knows about images or models.
"""
