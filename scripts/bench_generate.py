#!/usr/bin/env python
"""Benchmark decoding with FMT's multilevel cache against the same weights with dense attention.

For each context length: median milliseconds per decoded token and the bytes each cache holds, FMT (FMA +
FMTCache) against dense SDPA + transformers' DynamicCache, interleaved, on a model of SmolLM2-135M's shape with
random weights. Caches are random tensors of the right shape rather than prefills (a decoding step's cost does
not depend on the cached values); see benchmarks/generate_steps.py. Writes a log-log PNG plus the raw numbers.

Quick run:  python scripts/bench_generate.py --lengths 1024 4096 --steps 4

With --batch_sizes: decoding throughput by batch size instead, on the 4-layer, 256-wide byte model after
a real prefill of --prompt_len tokens per row; FMT and dense interleaved, medians over --repeats:
            python scripts/bench_generate.py --batch_sizes 1 8 64 --prompt_len 2048 --out outputs/bench_batch.png

With --model_name_or_path: real checkpoints on real prompts (benchmarks/generate_checkpoints.py): an FMT checkpoint
(FMA + FMTCache) against --dense_model_name_or_path (or the same weights under sdpa + DynamicCache), model.generate
after the first --prompt_lens tokens of held-out documents, each model and length in a fresh subprocess; time to
first token, decoding tokens/s, cache bytes and peak resident memory:
            python scripts/bench_generate.py --model_name_or_path outputs/smollm2-fmt \
                --dense_model_name_or_path outputs/smollm2-dense --prompt_lens 8192 32768 --new_tokens 32 \
                --threads 2
"""

from transformers import HfArgumentParser

from benchmarks.generate import GenerateBenchArguments, bench_generate


def parse_args(argv: list[str] | None = None) -> tuple[GenerateBenchArguments]:
    """The command line (or `argv`) as its dataclasses; runs nothing."""
    parser = HfArgumentParser(GenerateBenchArguments, description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> None:
    """Run `benchmarks.generate.bench_generate` on the command line (or `argv`)."""
    bench_generate(*parse_args(argv))


if __name__ == "__main__":
    main()
