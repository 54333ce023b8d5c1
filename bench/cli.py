"""`nmt-bench`: benchmarks that compare side by side in one run.

    nmt-bench decode ...   every decoder on the same weights (bench/decode.py)
    nmt-bench load ...     the server under load (bench/load.py)
    nmt-bench reload ...   new model versions loaded under load: failures, versions answering (bench/reload.py)
    nmt-bench fairness ... two models, one under load: the other's latency; RSS per loaded model (bench/fairness.py)
    nmt-bench soak ...     the server at a steady load for minutes: memory and latency growth (bench/soak.py)
    nmt-bench train ...    training tokens/s per step, fp32/bf16, eager/compile (bench/train_speed.py)
    nmt-bench robustness ... the same test sentences as paragraphs, ALL CAPS, Title Case, without final
                           punctuation, with URLs/numbers to keep; odd inputs (bench/robustness.py)
    nmt-bench text-cost ...  the text pipeline on against off under load; a long text vs its sentences apart
    nmt-bench segmentation ...  sentence-segmentation libraries: accuracy, speed, offsets (bench/segmentation.py)

Each subcommand is imported only when asked for: `decode` needs torch and CTranslate2,
`load` and `soak` only the client side.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    "decode": "nmt.bench.decode",
    "load": "nmt.bench.load",
    "soak": "nmt.bench.soak",
    "reload": "nmt.bench.reload",
    "fairness": "nmt.bench.fairness",
    "train": "nmt.bench.train_speed",
    "segmentation": "nmt.bench.segmentation",
    "robustness": "nmt.bench.robustness",
    "text-cost": "nmt.bench.text_cost",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nmt-bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        help="decode: engines side by side; load: server load; "
        "reload: model versions loaded under load; fairness: a model's latency while another is "
        "loaded; soak: server growth over minutes; "
        "train: training speed; "
        "segmentation: sentence splitters side by side; robustness: paragraphs, case, punctuation, "
        "protected spans and odd inputs against plain sentences",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the subcommand's own options (see COMMAND --help)")
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command])
    return int(module.main(args.args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
