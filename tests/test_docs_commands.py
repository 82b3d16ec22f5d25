"""The commands and snippets of README.md, docs/*.md and model_cards/*.md work as written.

Every ```bash block is split into commands (continuation lines joined, comments dropped), and each command is
checked by the rule for its program:

- cheap ones run as written, in a temporary folder: the scripts in `RUN_AS_WRITTEN`, `mkdir`; `NAME=$(command)`
  runs `command` and must print one line, which later commands of the page may use as `$NAME`;
- any other script of scripts/ (training, conversion, benchmarks): the script exists and its own parser accepts the
  flags, `parse_args(argv)` (every script exposes one), in this process; so `--help` prints the script's help;
- `accelerate launch`: accelerate's parser accepts the launcher's flags, and the script's parser the script's;
- `make`: make knows the targets (`make -n`);
- `pip install`: only the project with extras that setup.cfg defines, under a constraints file of the repository;
- `lm-eval`: lm-eval's parser accepts the flags, and the tasks are the ones `--include_path` ships.

A command of any other kind fails: documenting a new kind of command means adding its rule here. Every ```python
block compiles, and the self-contained ones (no names from outside the block) run as a user runs them: in a fresh
interpreter (with this checkout's `fmt_hf` importable, so a missing `import fmt_hf` or `trust_remote_code=True`
shows), stdin closed (transformers' "[y/N]" question fails the test), in a temporary folder holding the README's
`my-fmt` checkpoint with its tokenizer. A command documented twice is checked once. Commands and snippets that
fetch from the package index are marked `download`.
"""

import ast
import builtins
import configparser
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.lm import run_fresh, script

import fmt_hf

REPO = Path(__file__).resolve().parents[1]
CARD_TEMPLATE = REPO / "model_cards" / "template.md"
"""Not documentation: its blocks are Jinja that renders into each model card (tests/toolkit/test_hub.py)."""
PAGES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted(set((REPO / "model_cards").glob("*.md")) - {CARD_TEMPLATE}),
]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SUBSTITUTION = re.compile(r"^([A-Za-z_]\w*)=\$\((.*)\)$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
VARIABLE = re.compile(r"\$([A-Za-z_]\w*)")

RUN_AS_WRITTEN = {"fetch_smollm2.py"}
"""Scripts cheap enough to run as the documentation writes them (seconds; a download the first time)."""
FETCHES = ("fetch_smollm2.py", "load_corpus(")
"""Text that marks a command or snippet as fetching from the package index (unless cached)."""
TALKS_TO_A_SERVER = ("base_url=",)
"""Text that marks a snippet as a client of a running server (docs/serving.md): compiled, not run (a live server is
tests/toolkit/test_serve.py's to start)."""
RUN_TIMEOUT_S = 300


@dataclass(frozen=True)
class Command:
    where: str  # page:line, for the test id and messages
    text: str  # the command line, continuation lines joined
    variables: frozenset[str]  # names a `NAME=$(...)` earlier on the same page assigns


@dataclass(frozen=True)
class Snippet:
    where: str
    code: str


def blocks(language: str):
    """(page:line, body) of every fenced block in `language` of the documentation pages."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start(2)) + 1
                yield f"{page.relative_to(REPO)}:{line}", line, match.group(2)


def commands() -> list[Command]:
    found, assigned = [], {}
    for where, first_line, body in blocks("bash"):
        page = where.split(":")[0]
        pending, start = "", None
        for offset, raw in enumerate(body.splitlines()):
            line = raw.strip()
            if start is None:
                if not line or line.startswith("#"):
                    continue
                start = first_line + offset
            pending += line[:-1] + " " if line.endswith("\\") else line
            if line.endswith("\\"):
                continue
            names = frozenset(assigned.get(page, ()))
            found.append(Command(f"{page}:{start}", pending, names))
            if match := SUBSTITUTION.match(pending):
                assigned.setdefault(page, set()).add(match.group(1))
            pending, start = "", None
    unique = {}
    for command in found:  # a command documented twice is checked once, where it first appears
        unique.setdefault((command.text, command.variables & set(VARIABLE.findall(command.text))), command)
    return list(unique.values())


def snippets() -> list[Snippet]:
    return [Snippet(where, body) for where, _, body in blocks("python")]


def marked(items):
    return [
        pytest.param(item, id=item.where, marks=[pytest.mark.download] if any(f in str(item) for f in FETCHES) else [])
        for item in items
    ]


def test_pages_have_commands_and_snippets():
    """The extraction finds the blocks (a changed fence syntax would otherwise test nothing)."""
    assert len(commands()) >= 20
    assert len(snippets()) >= 2


def run_subprocess(argv: list[str], cwd: Path, env: dict[str, str], where: str) -> str:
    """Run `argv` as the documentation writes it; `.venv/bin/X` is this interpreter's X, `scripts/...` the repo's."""
    program = argv[0]
    if program.startswith(".venv/bin/"):
        program = str(Path(sys.executable).parent / program.removeprefix(".venv/bin/"))
    elif program in ("python", "python3"):
        program = sys.executable
    argv = [program, *(str(REPO / a) if a.startswith("scripts/") else a for a in argv[1:])]
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **env}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"{where}: `{shlex.join(argv)}` exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def check_script(script_path: str, argv: list[str], where: str, cwd: Path, env: dict[str, str]) -> str:
    """A script of scripts/: run it (RUN_AS_WRITTEN) or parse its flags with its own parser; return what it printed."""
    path = Path(script_path)
    assert path.parts[0] == "scripts" and (REPO / path).is_file(), f"{where}: no script {script_path}"
    if path.name in RUN_AS_WRITTEN:
        return run_subprocess(["python", script_path, *argv], cwd, env, where)
    module = script(path.stem)
    assert hasattr(module, "parse_args"), f"{where}: {script_path} has no parse_args(argv)"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            module.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 0 after --help, 2 on flags it does not accept
        if exit_.code not in (0, None):
            pytest.fail(f"{where}: {script_path} does not accept {shlex.join(argv)} (exit {exit_.code})")
    except ValueError as error:  # HfArgumentParser's unused flags, or a dataclass's check of a value
        pytest.fail(f"{where}: {script_path}: {error}")
    return printed.getvalue()


def check_pip(argv: list[str], where: str) -> None:
    """`pip install [--constraint FILE] -e ".[extras]"`: the constraints file exists, setup.cfg defines the extras."""
    assert argv[:1] == ["install"], f"{where}: only `pip install` of the project is documented"
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    extras = set(setup["options.extras_require"])
    rest = argv[1:]
    while rest:
        flag, value, rest = rest[0], rest[1] if len(rest) > 1 else "", rest[2:]
        if flag in ("--constraint", "-c"):
            assert (REPO / value).is_file(), f"{where}: no constraints file {value}"
        elif flag in ("--editable", "-e"):
            match = re.fullmatch(r"\.\[([\w,-]+)\]", value)
            assert match, f"{where}: `pip install -e {value}`: only the project itself, `.[extras]`"
            unknown = set(match.group(1).split(",")) - extras
            assert not unknown, f"{where}: setup.cfg has no extras {sorted(unknown)}"
        else:
            pytest.fail(f"{where}: `pip install {flag}` is not a documented kind of install")


def check_lm_eval(argv: list[str], where: str) -> None:
    """lm-eval's own parser takes the flags; `--tasks` are tasks the `--include_path` folder defines."""
    lm_eval_cli = pytest.importorskip("lm_eval._cli")
    args = lm_eval_cli.HarnessCLI()._parser.parse_args(argv)
    folder = REPO / args.include_path
    assert folder.is_dir(), f"{where}: no --include_path folder {args.include_path}"
    defined = {
        match.group(1)
        for yaml in folder.glob("*.yaml")
        for match in re.finditer(r"^task:\s*(\S+)", yaml.read_text(encoding="utf-8"), re.M)
    }
    unknown = set(args.tasks) - defined
    assert not unknown, f"{where}: {args.include_path} defines no tasks {sorted(unknown)}"


def check_fmt_serve(argv: list[str], where: str) -> None:
    """`fmt-serve CHECKPOINT [options]`: its own command line (transformers serve's options) accepts them; nothing
    is served."""
    click = pytest.importorskip("click")
    from fmt_hf.toolkit.serve import command

    try:
        command().make_context("fmt-serve", list(argv))
    except click.exceptions.Exit as exit_:  # --help
        assert exit_.exit_code == 0, f"{where}: fmt-serve {shlex.join(argv)} exited {exit_.exit_code}"
    except click.ClickException as error:
        pytest.fail(f"{where}: fmt-serve does not accept {shlex.join(argv)}: {error.format_message()}")


def check(argv: list[str], where: str, cwd: Path, env: dict[str, str]) -> str | None:
    """Check one command by the rule of its program; return its output when it ran."""
    program = argv[0].removeprefix(".venv/bin/")
    if program in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        return check_script(argv[1], argv[2:], where, cwd, env)
    if program == "accelerate" and argv[1:2] == ["launch"]:
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(argv[2:])
        return check_script(launch.training_script, launch.training_script_args, where, cwd, env)
    if program == "make":
        for target in argv[1:]:
            done = subprocess.run(["make", "-n", "-C", str(REPO), target], capture_output=True, text=True)
            assert done.returncode == 0, f"{where}: make has no target {target!r}: {done.stderr}"
        return None
    if program == "pip":
        return check_pip(argv[1:], where)
    if program == "lm-eval":
        return check_lm_eval(argv[1:], where)
    if program == "fmt-serve":
        return check_fmt_serve(argv[1:], where)
    if program == "mkdir":
        return run_subprocess(argv, cwd, env, where)
    pytest.fail(f"{where}: no rule for `{program}` commands; add one to tests/test_docs_commands.py")


@pytest.mark.parametrize("command", marked(commands()))
def test_documented_command(command: Command, tmp_path):
    text, substituted = command.text, None
    if match := SUBSTITUTION.match(text):
        substituted, text = match.group(1), match.group(2)
    for name in VARIABLE.findall(text):
        assert name in command.variables, f"{command.where}: ${name} is not assigned earlier on the page"
    argv = shlex.split(text, comments=True)
    env = {}
    while argv and ENV_ASSIGNMENT.match(argv[0]):
        name, value = argv.pop(0).split("=", 1)
        env[name] = value
    if argv[:2] == ["nice", "-n"]:
        argv = argv[3:]
    output = check(argv, command.where, tmp_path, env)
    if substituted is not None:
        assert output is not None and len(output.strip().splitlines()) == 1, (
            f"{command.where}: ${substituted} needs a command that runs and prints one line"
        )


def free_names(tree: ast.AST) -> set[str]:
    """Names a snippet reads but neither binds nor imports, nor are builtins: what it needs from outside."""
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg)):
            bound.add(node.name if not isinstance(node, ast.arg) else node.arg)
    return read - bound


@pytest.fixture(scope="module")
def readme_checkpoint(tmp_path_factory) -> Path:
    """The README's `my-fmt` (its config, random weights) with the byte tokenizer, as the README saves them."""
    folder = tmp_path_factory.mktemp("readme") / "my-fmt"
    torch.manual_seed(0)
    config = fmt_hf.FMTConfig(
        vocab_size=259, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, fma_block_size=32
    )
    fmt_hf.FMTForCausalLM(config).save_pretrained(folder)
    fmt_hf.byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("snippet", marked(snippets()))
def test_documented_snippet(snippet: Snippet, readme_checkpoint, tmp_path):
    tree = ast.parse(snippet.code, filename=snippet.where)
    compile(tree, snippet.where, "exec")
    if free_names(tree) or any(text in snippet.code for text in TALKS_TO_A_SERVER):
        return  # a fragment of the page's story, or a server's client: compiling is all it can be checked for
    shutil.copytree(readme_checkpoint, tmp_path / readme_checkpoint.name)
    run_fresh(snippet.code, tmp_path)


def test_readme_is_a_front_door_and_no_page_cites_a_tracker():
    """The README stays short (the rest lives in docs/), and neither code nor docs refer to tracker numbers that
    are not in the repository."""
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 150
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    tracker = re.compile(r"\bissues?[ _#]+\d+", re.I)
    cited = [
        name
        for name in tracked
        if name.endswith((".py", ".md", ".cfg", ".toml", ".yaml", "Makefile"))
        and tracker.search((REPO / name).read_text(encoding="utf-8"))
    ]
    assert not cited, cited
