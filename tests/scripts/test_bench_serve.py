"""scripts/bench_serve.py and benchmarks/serving.py: the documented command lines, the arguments' checks, the
statistics and the table (the servers themselves are tests/toolkit/test_serve.py's)."""

import pytest
from helpers.lm import script

from benchmarks.serving import ServeBenchmarkArguments, format_table, percentile


def test_documented_command_lines_parse():
    (args,) = script("bench_serve").parse_args(["--prompt_tokens", "4096", "--clients", "1", "4", "8"])
    assert (args.prompt_tokens, args.clients, args.new_tokens, args.checkpoint) == (4096, [1, 4, 8], 16, None)
    (args,) = script("bench_serve").parse_args(["--checkpoint", "outputs/smollm2-fmt", "--prompt_tokens", "8192"])
    assert (args.checkpoint, args.prompt_tokens, args.clients) == ("outputs/smollm2-fmt", 8192, [1, 4, 8])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prompt_tokens": 0}, "--prompt_tokens must be at least 1, got 0"),
        ({"new_tokens": -1}, "--new_tokens must be at least 1, got -1"),
        ({"clients": [4, 0]}, r"--clients must be one or more counts of at least 1, got \[4, 0\]"),
        ({"clients": []}, "--clients must be one or more counts"),
    ],
)
def test_bad_arguments_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        ServeBenchmarkArguments(**options)


def test_percentiles_and_table():
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([float(v) for v in range(21)], 0.95) == pytest.approx(19.0)
    row = {"clients": 4, "requests": 8, "prompt_tokens": 4096, "requests_per_s": 0.5, "p50_s": 7.0, "p95_s": 9.5}
    results = {"rows": [{"implementation": "fma", **row}], "peak_memory_bytes": {"fma": 3 * 2**20, "sdpa": 2**30}}
    assert format_table(results).splitlines()[2:] == [
        "| fma | 4 | 8 | 4096 | 0.500 | 7.00 | 9.50 |",
        "",
        "Peak resident memory of the server: fma 3 MiB, sdpa 1024 MiB",
    ]
