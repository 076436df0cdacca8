"""Built-in tasks (see :class:`replay.Task`).

- ``replay.tasks.toy_nmt:ToyNMT`` — a small Transformer encoder–decoder on a synthetic
  parallel corpus with Zipfian word frequencies (the demo task).
- ``replay.tasks.tiny_mlp:TinyMLP`` — an MLP on Gaussian blobs (tests, examples).
- ``replay.tasks.tiny_cnn:TinyCNN`` — a two-convolution classifier on synthetic images, with
  torchvision-style names (``features.N``, ``classifier.N``).
- ``replay.tasks.hf:HFTask`` — a Hugging Face language model rebuilt from its stored config,
  on splits saved with ``datasets`` (what ``replay.integrations.hf.LCACallback(data=...)``
  stores).
- ``replay.tasks.catalog_nmt:CatalogNMT`` — a fairseq-shaped Transformer translating the
  gettext message catalogs installed on the machine (a real corpus; ``lca paper``).
"""
