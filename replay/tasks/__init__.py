"""Built-in tasks (see :class:`replay.Task`).

- ``replay.tasks.toy_nmt:ToyNMT`` — a small Transformer encoder–decoder on a synthetic
  parallel corpus with Zipfian word frequencies (the demo task).
- ``replay.tasks.catalog_nmt:CatalogNMT`` — a fairseq-shaped Transformer translating the
  gettext message catalogs installed on the machine (a real corpus; ``lca paper``).
"""
