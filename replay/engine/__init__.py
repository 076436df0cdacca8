"""The replay engine: the driver (:mod:`~replay.engine.driver`) plans a replay and runs one task
per piece of steps (:mod:`~replay.engine.piece`), which integrates gradients along each update
(:mod:`~replay.engine.quadrature`, :mod:`~replay.engine.gradients`) and reduces them into groups
(:mod:`~replay.engine.kernel`)."""
