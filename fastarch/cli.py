"""The ``fastarch`` command: ``fastarch info`` and ``fastarch bench``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastarch", description="fastarch kernels: information and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends each op can use here (and why not)")
    bench = sub.add_parser("bench", help="time fastarch's ops against PyTorch eager and torch.compile")
    from fastarch.bench.cli import add_arguments

    add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastarch.system_info import info

        info()
        return 0
    from fastarch.bench.cli import run

    return run(args)
