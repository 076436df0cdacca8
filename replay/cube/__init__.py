"""The LCA cube on disk: creating and writing it (:mod:`~replay.cube.writer`) and the locks that
let several replays fill one cube (:mod:`~replay.cube.lock`)."""
