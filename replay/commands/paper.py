"""``lca paper CONFIG --out DIR``: Zhu et al.'s experiments on a real corpus in one command.

Trains a translation model with recording, scores it (BLEU vs copying the source), replays it
as the paper does (one fresh mini-batch per update, first-order) on train and test, runs the
§3.2 simulation (exact vs sampled on a small subset, and the two error sources apart), and
writes DIR/findings.json and the reports. Re-running on the same DIR reuses every finished
stage (:mod:`replay.paper.stages`); see docs/paper.md.
"""

from __future__ import annotations

import sys
import time


def register(sub) -> None:
    p = sub.add_parser(
        "paper", help="reproduce Zhu et al. on the machine's gettext catalogs (findings.json)",
        description="Train and record a Transformer translator on the installed gettext "
        "catalogs, replay it as Zhu et al. do, run their exact-vs-sampled simulation and judge "
        "their findings one by one in DIR/findings.json and DIR/report. Resumable: re-running "
        "on DIR reuses each finished stage.")
    p.add_argument("config", metavar="CONFIG", help="YAML config, e.g. configs/paper.yaml")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--scheduler", help="replay scheduler (default: the config's replay.scheduler)")
    p.set_defaults(func=main)


def main(args) -> int:
    from replay.paper.settings import load_paper_config
    from replay.paper.stages import run_paper

    config = load_paper_config(args.config)
    began = time.perf_counter()
    findings = run_paper(config, args.out, args.scheduler, _say)
    held = sum(c["holds"] for c in findings["claims"])
    _say(f"paper finished in {time.perf_counter() - began:.0f} s: {held} of "
         f"{len(findings['claims'])} claims hold on this run; open {args.out}/report/index.html")
    return 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
