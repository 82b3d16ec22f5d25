#!/usr/bin/env python
"""Quality against the field: the same small byte-level LM trained with each attention at an equal budget.

Trains FMA (depthwise, recursive, avgpool, coarse queries), dense SDPA, a sliding window with FMA's near field only,
h-transformer-1d and Performer, the ablations over m, p, scale_attn and the boundary, and a long-range recall probe;
appends one JSON row per run to --output_file as it finishes (a rerun skips finished runs), then writes the markdown
tables and plots. Engine: benchmarks/quality.py. Examples:

    # the whole suite, one thread, resumable (docs/benchmarks.md records the commands it was run with)
    OMP_NUM_THREADS=1 python scripts/bench_quality.py --output_file runs/quality.jsonl --report_dir docs/img

    # a quick look: two runs at a tiny budget
    python scripts/bench_quality.py --output_file /tmp/q.jsonl --runs dense,fma-depthwise --steps 5 --seq_len 256

    # training-step time of the main attentions side by side (interleaved, medians)
    python scripts/bench_quality.py --timing --output_file runs/timing.json
"""

from transformers import HfArgumentParser

from benchmarks.quality import QualityBenchArguments, bench_quality
from benchmarks.quality_suite import SuiteConfig


def parse_args(argv: list[str] | None = None) -> tuple[QualityBenchArguments, SuiteConfig]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser((QualityBenchArguments, SuiteConfig), description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run `benchmarks.quality.bench_quality` on the command line (or `argv`); return the rows."""
    return bench_quality(*parse_args(argv))


if __name__ == "__main__":
    main()
