"""Recording a training run: the :class:`~replay.record.recorder.Recorder` in the training
process, and the writer process it feeds (:mod:`replay.record.writer`, torch-free)."""
