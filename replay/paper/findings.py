"""Stage 6 of ``lca paper``: ``DIR/findings.json`` and the two reports.

findings.json (documented in docs/paper.md)::

    {"language", "direction",
     "pairs": {"train", "valid", "test"},
     "bleu": {"test", "copy_baseline"},
     "tau": {"<grouping>/<dataset>": τ of the sampled vs the exact simulation replay},
     "claims": [{"id", "claim", "paper", "measured", "holds"}, ...]}
"""

from __future__ import annotations

import os

from replay.paper.settings import PaperConfig
from replay.paper.output import Log, write_json


def write_findings(config: PaperConfig, out: str, task, sizes: dict, bleu: dict, cube: str,
                   sim: dict[str, str], log: Log) -> dict:
    from analysis import compare, open_cube, write_report
    from analysis.claims import Evidence, claims_table, judge

    paper = open_cube(cube)
    exact, sampled, quad = (open_cube(sim[k]) for k in ("exact", "sampled", "quadrature"))
    claims = judge(Evidence(paper, exact, sampled, quad, window=config.analysis.smooth))
    cmp = compare(sampled, exact)
    tau = {f"{g}/{d}": float(cmp["tau"].sel(grouping_name=g, dataset=d))
           for g in cmp["grouping_name"].values for d in cmp["dataset"].values}
    args = config.task.args
    findings = {
        "language": getattr(task, "language", args.get("language")),
        "direction": getattr(task, "direction", args.get("direction")),
        "pairs": {k: sizes.get(k, 0) for k in ("train", "valid", "test")},
        "bleu": {"test": bleu.get("test"), "copy_baseline": bleu.get("copy_baseline")},
        "tau": tau,
        "claims": claims,
    }
    write_json(os.path.join(out, "findings.json"), findings)
    held = sum(c["holds"] for c in claims)
    log(f"      {held} of {len(claims)} claims hold: "
        + ", ".join(f"{c['id']} {'yes' if c['holds'] else 'no'}" for c in claims))

    run_table = (["quantity", "value"], [
        ["language, direction", f"{findings['language']}, {findings['direction']}"],
        ["pairs train / valid / test", " / ".join(str(findings["pairs"][k])
                                                  for k in ("train", "valid", "test"))],
        ["BLEU on test (greedy)", _num(bleu.get("test"))],
        ["BLEU of copying the source", _num(bleu.get("copy_baseline"))],
        ["BLEU signature", str(bleu.get("signature", "n/a"))],
        ["corpus sha256", str(getattr(task, "fingerprint", "n/a"))],
    ])
    error = next(c for c in claims if c["id"] == "sampling_error_dominates")["measured"]
    error_table = (["error source (simulation, train, transformer grouping)",
                    "relative L1 of module totals", "Kendall's τ"],
                   [[name, _num(error[name]["relative_l1"]), _num(error[name]["tau"])]
                    for name in ("sampling", "quadrature", "both")])
    tau_table = (["grouping/dataset", "Kendall's τ (sampled vs exact, first-order)"],
                 [[k, _num(v)] for k, v in tau.items()])
    extra = [("Run: corpus and translation quality", run_table),
             ("Findings: Zhu et al.'s claims judged on this run", claims_table(claims)),
             ("Simulation (§3.2): the two sources of approximation error", error_table)]
    index = write_report(paper, os.path.join(out, "report"), cube_path=cube, extra_tables=extra)
    sim_index = write_report(sampled, os.path.join(out, "report-simulation"), reference=exact,
                             cube_path=sim["sampled"], reference_path=sim["exact"],
                             extra_tables=[("Figure 1: rank agreement", tau_table),
                                           extra[2]])
    log(f"      open {index} and {sim_index}; findings in {os.path.join(out, 'findings.json')}")
    return findings


def _num(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"
