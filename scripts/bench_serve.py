#!/usr/bin/env python
"""Serving benchmark: requests/s and p50/p95 latency of fmt-serve at 1, 4 and 8 concurrent clients, FMT against the
same weights dense (sdpa), and the server's peak resident memory, in one run. Engine: benchmarks/serving.py.

    # docs/serving.md's table (a random byte-level FMT, 4K-token prompts, 16 new tokens each)
    OMP_NUM_THREADS=1 python scripts/bench_serve.py --prompt_tokens 4096 --clients 1 4 8

    # a checkpoint of your own (it needs a chat template)
    python scripts/bench_serve.py --checkpoint outputs/smollm2-fmt --prompt_tokens 8192
"""

import json
from pathlib import Path

from transformers import HfArgumentParser

from benchmarks.serving import ServeBenchmarkArguments, format_table, run


def parse_args(argv: list[str] | None = None) -> tuple[ServeBenchmarkArguments]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser(ServeBenchmarkArguments, description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, prints its table and writes the results to --output; returns them."""
    (args,) = parse_args(argv)
    results = run(args)
    print("\n" + format_table(results))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {output}")
    return results


if __name__ == "__main__":
    main()
