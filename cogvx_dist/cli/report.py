"""`cogvx report RUN_DIR`: loss, throughput, memory and learning-rate plots and a summary of a run."""

from __future__ import annotations

import argparse


def configure(report: argparse.ArgumentParser, name: str = "report") -> None:
    """Arguments and handler of `cogvx report`."""
    report.set_defaults(handler=run)
    report.add_argument("run_dir", help="training output_dir (holding metrics.jsonl)")
    report.add_argument("--out", help="output folder (default RUN_DIR/report)")


def run(args: argparse.Namespace) -> int:
    from cogvx_dist.results.report import write_report

    summary = write_report(args.run_dir, args.out)
    print(summary["text"], end="")
    print("plots: " + ", ".join(summary["plots"].values()))
    return 0
