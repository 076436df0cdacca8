"""Recording from training frameworks (DESIGN §10).

- :mod:`replay.integrations.hf` — ``LCACallback`` for the Hugging Face ``Trainer``.
- :mod:`replay.integrations.lightning` — ``LCACallback`` for ``lightning.pytorch.Trainer``.

Each callback drives a :class:`replay.Recorder` on the main process: θ after every real
optimizer step, one trajectory step per step (gradient accumulation included).
"""
