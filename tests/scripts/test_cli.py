"""One command-line style for every script in scripts/, each a thin layer over the package: HfArgumentParser over
dataclasses, `--snake_case` flags, `parse_args(argv)` (the parsed dataclasses, no work done) and `main(argv)` (one
call into the package) and nothing else; every command line a script's docstring documents parses."""

import ast
import dataclasses
import re
import shlex

import pytest
from helpers.lm import REPO, script

SCRIPTS = sorted(path.stem for path in (REPO / "scripts").glob("*.py"))


def documented_commands(doc: str) -> list[tuple[str, list[str]]]:
    """(script, argv) of every complete `python scripts/<name>.py ...` command in `doc` (continued lines joined;
    commands with an elided `...` left out)."""
    text = re.sub(r"\$\(([^()]*)\)", r"\1", doc.replace("\\\n", " "))
    commands = []
    for match in re.finditer(r"python scripts/(\w+)\.py\b([^\n]*)", text):
        if "..." not in match.group(2):
            commands.append((match.group(1), shlex.split(match.group(2))))
    return commands


def test_every_script_has_one_cli_style():
    # The exact set: adding or removing a script is a change to this list, not a silent count.
    assert SCRIPTS == [
        "bench_attention",
        "bench_conversion",
        "bench_generate",
        "bench_quality",
        "bench_serve",
        "check_gpu",
        "convert_llama",
        "demo_attention",
        "eval_lm",
        "eval_long_context",
        "fetch_smollm2",
        "main_demo",
        "push_to_hub",
        "train",
    ]
    for name in SCRIPTS:
        source = (REPO / "scripts" / f"{name}.py").read_text()
        assert "HfArgumentParser" in source and "argparse" not in source, name
        # Thin: the work lives in the package (fmt_hf.toolkit, benchmarks); a script only parses and calls it.
        tree = ast.parse(source)
        defined = [
            node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Assign | ast.AnnAssign)
        ]
        assert [getattr(node, "name", None) for node in defined] == ["parse_args", "main"], name
        module = script(name)
        assert callable(module.parse_args) and callable(module.main), name


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_cleanly(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    flags = re.findall(r"--\w[\w-]*", capsys.readouterr().out)
    # kebab spellings exist only as HfArgumentParser's aliases of the snake_case flags
    assert all(flag.replace("-", "_")[2:] in {f[2:] for f in flags} for flag in flags if "-" in flag[2:]), flags


@pytest.mark.parametrize("name", SCRIPTS)
def test_documented_command_lines_parse(name):
    commands = documented_commands(script(name).__doc__)
    for command, argv in commands:
        parsed = script(command).parse_args(argv)
        assert isinstance(parsed, tuple) and all(dataclasses.is_dataclass(item) for item in parsed), (command, argv)


def test_flags_keep_their_meaning_under_snake_case_names():
    (args,) = script("bench_attention").parse_args(
        ["--lengths", "16384", "--compare_downsample", "recursive", "--sdpa_max_n", "0", "--no_progress"]
    )
    assert args.lengths == [16384] and args.compare_downsample == ["recursive"] and args.sdpa_max_n == 0
    assert args.no_progress and args.bench_config().compare_downsample == ("recursive",)
    (args,) = script("check_gpu").parse_args(["--device", "cpu", "--kv_heads", "2", "--exact_lengths", "100"])
    cfg = args.check_config()
    assert (cfg.kv_heads, cfg.heads, cfg.exact_lengths) == (2, 16, (100,))
    (args,) = script("check_gpu").parse_args(["--device", "cpu"])
    assert args.check_config().exact_lengths == (100, 333)  # the CPU dry run's default
    with pytest.raises(SystemExit):
        script("bench_attention").parse_args(["--modes", "sideways"])
