"""transformers' common model tests (`ModelTesterMixin`, `ConfigTester`, `TrainingTesterMixin`) for FMT.

They ship in the transformers sdist (tests/*.py), not in the wheel. `python tests/helpers/transformers_common.py`
(run by `make test` before pytest) downloads the sdist of the installed version from the package index into a cache
outside the repository (TRANSFORMERS_COMMON_TESTS_CACHE, default ~/.cache/fmt_hf/transformers-tests); collecting the
tests only reads that cache (`load`), never downloads. The sdist lacks three helper modules they import; minimal
stand-ins are written next to them (see `_STANDINS`).
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import types

import transformers
from filelock import FileLock

_COMMON_PACKAGE = "transformers_common_tests"
_STANDINS = {
    # Generation and torch.export suites are separate test modules absent from the sdist: their mixins are empty,
    # so those tests are not collected (this file checks FMT's generate() itself).
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    # `ConfigTester.check_config_arguments_init` sets these base-config arguments to non-default values and
    # checks they stick: the list of transformers 5.x's tests/utils/test_configuration_utils.py.
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False, 'output_hidden_states': True, 'output_attentions': True, 'dtype': 'float16',\n"
        "    'chunk_size_feed_forward': 5, 'architectures': ['BertModel'], 'id2label': {0: 'label'},\n"
        "    'label2id': {'label': '0'}, 'problem_type': 'regression',\n"
        "}\n"
    ),
}


def _root() -> str:
    default_cache = os.path.join(os.path.expanduser("~"), ".cache", "fmt_hf", "transformers-tests")
    return os.path.join(os.environ.get("TRANSFORMERS_COMMON_TESTS_CACHE", default_cache), transformers.__version__)


def fetch() -> None:
    """Download the installed version's sdist (once) and lay out its common test modules in the cache."""
    version, root = transformers.__version__, _root()
    package_dir = os.path.join(root, _COMMON_PACKAGE)
    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(root, ".lock")):
        if os.path.isfile(os.path.join(package_dir, "__init__.py")):
            return
        sdist = os.path.join(root, f"transformers-{version}.tar.gz")
        if not os.path.isfile(sdist):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--quiet",
                    f"transformers=={version}",
                    "-d",
                    root,
                ],
                check=True,
                timeout=600,
            )
        staging = package_dir + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdist) as archive:
            prefix = f"transformers-{version}/tests/"
            members = [
                m
                for m in archive.getmembers()
                if m.name.startswith(prefix) and m.name.count("/") == 2 and m.name.endswith(".py")
            ]
            for member in members:
                with archive.extractfile(member) as source:
                    target = os.path.join(staging, os.path.basename(member.name))
                    os.makedirs(staging, exist_ok=True)
                    with open(target, "wb") as out:
                        out.write(source.read())
        for relative, content in _STANDINS.items():
            path = os.path.join(staging, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as out:
                out.write(content)
            open(os.path.join(os.path.dirname(path), "__init__.py"), "w").close()
        open(os.path.join(staging, "__init__.py"), "w").close()
        os.replace(staging, package_dir)


def load():
    """The common test modules as one namespace, or the reason they are unavailable (a string)."""
    root = _root()
    if not os.path.isfile(os.path.join(root, _COMMON_PACKAGE, "__init__.py")):
        version = transformers.__version__
        return f"not fetched for transformers {version}: run `python tests/helpers/transformers_common.py`"
    if root not in sys.path:
        sys.path.insert(0, root)
    namespace = types.SimpleNamespace()
    try:
        for name in ("test_modeling_common", "test_configuration_common", "test_training_mixin"):
            module = importlib.import_module(f"{_COMMON_PACKAGE}.{name}")
            namespace.__dict__.update(vars(module))
    except Exception as error:  # an incompatible sdist must not hide the other tests
        return f"{type(error).__name__}: {error}"
    return namespace


if __name__ == "__main__":
    fetch()
