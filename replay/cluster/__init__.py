"""Where replay tasks run: in-process or on Dask (:mod:`~replay.cluster.executor`), Dask
workers as batch jobs (:mod:`~replay.cluster.jobqueue`), or a SLURM job array
(:mod:`~replay.cluster.job_array`)."""
