"""``lca report`` and ``lca export``: the command-line face of the analysis package."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the ``report`` and ``export`` sub-commands to the ``lca`` parser."""
    report = subparsers.add_parser(
        "report", help="write figures, index.html and summary.md for a cube",
        description="Write the LCA figures (PNG), an offline index.html and summary.md for "
                    "CUBE into DIR; the figures follow the groupings the cube holds, and a cube "
                    "still being filled is reported over its done steps. DIR must be new, empty, "
                    "or a folder an earlier `lca report` wrote (it lists its files in "
                    "DIR/.lca-report.json); a folder holding any "
                    "other file is refused, so user data is never overwritten.")
    report.add_argument("cube", metavar="CUBE", help="cube directory written by `lca replay`")
    report.add_argument("--compare", metavar="OTHER", default=None,
                        help="reference cube of the same trajectory (e.g. the exact replay): "
                             "adds Kendall's tau, sign agreement and the occupation figures of "
                             "every grouping both cubes hold")
    report.add_argument("-o", "--output", metavar="DIR", required=True,
                        help="folder to write the report into")
    report.set_defaults(func=run_report)

    export = subparsers.add_parser(
        "export", help="write a cube as one netCDF file",
        description="Write CUBE (all variables, coordinates and attributes) as a netCDF-4 file.")
    export.add_argument("cube", metavar="CUBE", help="cube directory written by `lca replay`")
    export.add_argument("out", metavar="OUT.nc", help="netCDF file to write")
    export.add_argument("--force", action="store_true",
                        help="replace OUT.nc if it exists (otherwise refused)")
    export.set_defaults(func=run_export)


def run_report(args) -> int:
    from analysis.cube import open_cube
    from analysis.report import write_report

    cube = open_cube(args.cube)
    other = open_cube(args.compare) if args.compare else None
    index = write_report(cube, args.output, other, cube_path=args.cube,
                         reference_path=args.compare)
    print(f"lca report: wrote {index} and summary.md")
    return 0


def run_export(args) -> int:
    from analysis.cube import export_netcdf, open_cube

    out = export_netcdf(open_cube(args.cube), args.out, force=args.force)
    print(f"lca export: wrote {out}")
    return 0
