"""The flags the server benches share (load, soak, reload, fairness): where the sentences come from, and
how the server runs and where the report goes."""

from __future__ import annotations

import argparse
from pathlib import Path


def source_flags(p: argparse.ArgumentParser, bundle: Path, split: str) -> None:
    p.add_argument("--bundle", type=Path, default=bundle, help="model bundle (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, help="Multi30k directory (default: $NMT_DATA_DIR, else download)")
    p.add_argument("--split", default=split, help="source sentences (default: %(default)s)")


def run_flags(p: argparse.ArgumentParser, beam: int, threads: int, out: Path, report: str | None = None) -> None:
    """--beam, --threads, --out, and --force when the bench refuses to overwrite `report`.json/.md."""
    p.add_argument("--beam", type=int, default=beam, help="beam size, 1 = greedy (default: %(default)s)")
    p.add_argument("--threads", type=int, default=threads, help="server ORT intra-op threads; 0 = ORT default")
    p.add_argument("--out", type=Path, default=out, help="results directory (default: %(default)s)")
    if report is not None:
        p.add_argument("--force", action="store_true", help=f"overwrite {report}.json / {report}.md")
