"""The trajectory store: its format (:mod:`~replay.store.manifest`, :mod:`~replay.store.codec`),
reading (:mod:`~replay.store.trajectory`) and checking (:mod:`~replay.store.verify`).

This package's ``__init__`` imports nothing: the recorder's writer process loads the torch-free
modules of it (manifest, files) and must start fast."""
