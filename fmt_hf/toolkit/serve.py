"""`fmt-serve`: FMT checkpoints behind an OpenAI-compatible HTTP API, through transformers' own server.

`transformers serve` (`transformers.cli.serve`) already does what a server needs -- the OpenAI endpoints, chat
templates, streaming, request validation, the model in a process of its own -- and, without continuous batching,
generates with `model.generate`, so FMT's multilevel `FMTCache` serves every request. Two things stop it serving FMT
as it is, and `FMTServe` changes exactly those:

- its loader takes a checkpoint's class as `getattr(transformers, config.architectures[0])`, and `FMTForCausalLM` is
  no attribute of the `transformers` module (`FMTModelLoader` makes it one, in the model's process);
- a request's answer length reaches `generate` unchecked, in the model's process, where an error arrives only after
  a streamed response has started (status 200, then an error event), and the server's default of at least 1024 new
  tokens overflows any model whose context the prompt leaves less room in (`ContextBoundEngineClient` checks and
  bounds it first, for a 400 before anything streams).

Everything else, the options included, is `transformers serve`'s; the server listens on the loopback interface
unless `--host` says otherwise. `background_server` runs one in a subprocess (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import transformers
from transformers.cli.serve import Serve
from transformers.cli.serving import model_manager
from transformers.cli.serving.model_manager import EngineClient, ModelLoader
from transformers.cli.serving.utils import prompt_length

from ..model import FMTForCausalLM

LOOPBACK = "127.0.0.1"

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""A chat template for checkpoints without one (every base model this project trains or converts): a line
`role: content` per message, then `assistant:`. `/v1/chat/completions` needs a template; `/v1/completions` does not."""


class FMTModelLoader(ModelLoader):
    """transformers serve's `ModelLoader`, able to load FMT checkpoints (and, unchanged, any other model)."""

    def _load_model(self, model_id: str, tqdm_class: type | None = None, progress_callback=None):
        # Runs in the model's process, which `spawn` started: unpickling this loader imported this module, and with
        # it `fmt_hf`, which registers FMT with the Auto classes; the lookup by class name needs the attribute too.
        transformers.FMTForCausalLM = FMTForCausalLM
        return super()._load_model(model_id, tqdm_class=tqdm_class, progress_callback=progress_callback)


class ContextBoundEngineClient(EngineClient):
    """transformers serve's `EngineClient`, bounding a request's answer before it leaves for the model's process:
    `max_new_tokens` (the request's `max_tokens`, `max_completion_tokens` or `max_output_tokens`) must be at least 1,
    and an answer stops where prompt and answer fill the model's context (`--max-model-len`, else
    `max_position_embeddings`), with finish reason "length". Every endpoint checks the prompt's own length first."""

    def bound_answer(self, inputs: dict, generation_kwargs: dict) -> None:
        """Checks `generation_kwargs["max_new_tokens"]` and lowers it, in place, to the room the prompt leaves (the
        handler reads it back for the finish reason)."""
        max_new_tokens = generation_kwargs.get("max_new_tokens")
        if max_new_tokens is None:
            return
        if max_new_tokens < 1:
            raise ValueError(
                f"max_tokens (or max_completion_tokens, max_output_tokens) is {max_new_tokens}: it is the most tokens "
                "the answer may have, and must be at least 1."
            )
        context = self.generation_state.context_length(self.model_config)
        if context is not None:
            generation_kwargs["max_new_tokens"] = min(max_new_tokens, context - prompt_length(inputs))

    async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict):
        self.bound_answer(inputs, generation_kwargs)
        return await super().generate_non_streaming(inputs, generation_kwargs)

    def generate_streaming(self, inputs: dict, generation_kwargs: dict, response_parser=None):
        self.bound_answer(inputs, generation_kwargs)
        return super().generate_streaming(inputs, generation_kwargs, response_parser=response_parser)


class FMTServe(Serve):
    """`transformers serve` with `FMTModelLoader` and `ContextBoundEngineClient`."""

    # `Serve.__init__` builds its loader, then serves through `run` (or `run_api_servers`, whose API server processes
    # call `run` again): the model's process is started after `_adapt` in either path. `run` builds its
    # `ModelManager`, which creates each model's client by the module-level name `EngineClient`: the one seam short
    # of copying `Serve.run`.
    def _adapt(self) -> None:
        self.loader.__class__ = FMTModelLoader
        model_manager.EngineClient = ContextBoundEngineClient

    def run(self, *args, **kwargs) -> None:
        self._adapt()
        super().run(*args, **kwargs)

    def run_api_servers(self, *args, **kwargs) -> None:
        self._adapt()
        super().run_api_servers(*args, **kwargs)


def _listening_on_loopback(signature: inspect.Signature) -> inspect.Signature:
    """`Serve`'s command line with `--host` defaulting to the loopback interface rather than `localhost` (which can
    resolve to ::1 as well): a server is reachable from other machines only when asked to be."""
    parameters = [p.replace(default=LOOPBACK) if p.name == "host" else p for p in signature.parameters.values()]
    return signature.replace(parameters=parameters)


FMTServe.__signature__ = _listening_on_loopback(inspect.signature(Serve))
FMTServe.__doc__ = "Serve an FMT checkpoint (or any causal LM) with an OpenAI-compatible API.\n" + (
    Serve.__doc__ or ""
).replace("pip install transformers[serving]", "pip install 'fmt_hf[serve]'")


def command():
    """The `fmt-serve` command line as a click command (typer's, as `transformers serve`): `main` runs it; a test can
    parse a documented command line with `command().make_context("fmt-serve", argv)` without serving."""
    import typer

    # Plain help text: rich markup would take `pip install 'fmt_hf[serve]'` for a tag
    app = typer.Typer(add_completion=False, rich_markup_mode=None)
    app.command()(FMTServe)
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """The `fmt-serve` console script: `fmt-serve CHECKPOINT [--host 127.0.0.1] [--port 8000] [options]`, the
    options those of `transformers serve` (`fmt-serve --help`)."""
    command().main(args=argv, prog_name="fmt-serve")


@dataclass
class BackgroundServer:
    """A running `fmt-serve` subprocess: its `process` and the `url` of its API (`http://127.0.0.1:PORT/v1`)."""

    process: subprocess.Popen
    url: str

    def request(self, path: str, body: dict | bytes | None = None, timeout: float = 600.0) -> tuple[int, str]:
        """`GET url + path`, or `POST` `body` (a dict as JSON, bytes as they are); the status and text of the answer,
        a 4xx or 5xx included."""
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, data, headers), timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def background_server(checkpoint: str, *options: str, startup_timeout: float = 180.0) -> Iterator[BackgroundServer]:
    """Runs `fmt-serve checkpoint *options` on a free loopback port until the block ends, then stops it by its
    process id (SIGTERM, which also stops its model's process; SIGKILL after 15 s).

    Waits, polling `/health` four times a second for at most `startup_timeout` seconds, until the model is loaded;
    a server that exits or does not answer in time is a `RuntimeError` carrying the end of its output."""
    port = free_port()
    command = [sys.executable, "-m", "fmt_hf.toolkit.serve", checkpoint, "--host", LOOPBACK, "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([*command, *options], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        server = BackgroundServer(process, f"http://{LOOPBACK}:{port}/v1")
        try:
            deadline = time.monotonic() + startup_timeout
            while not _answers_health(f"http://{LOOPBACK}:{port}/health"):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode(errors="replace")[-4000:]
                    state = f"exited with {process.returncode}" if process.poll() is not None else "did not answer"
                    raise RuntimeError(f"fmt-serve {checkpoint} {state} in time; its output ends:\n{output}")
                time.sleep(0.25)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers_health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


if __name__ == "__main__":
    main()
