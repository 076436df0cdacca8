"""``lca paper``: Zhu et al.'s experiments on a real corpus, in stages (see docs/paper.md).

- :mod:`replay.paper.settings`: the sections of ``configs/paper.yaml``.
- :mod:`replay.paper.training`: a fairseq-like training loop that records its trajectory.
- :mod:`replay.paper.stages`: train, BLEU, the paper's replay, the §3.2 simulation.
- :mod:`replay.paper.findings`: findings.json and the reports.
- :mod:`replay.paper.output`: the log type and strict JSON files every stage writes.
"""
