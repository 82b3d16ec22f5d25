import pytest
import torch

from fmt_hf.toolkit.tokenizer import byte_tokenizer

# One intra-op thread per test process: the suite's models are tiny, and `make test` runs two xdist workers on
# two cores, where extra threads only contend (a tiny training step measured 5 ms with one thread, 170 ms with two).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "download: needs files from the package index (registry corpora, the "
        "transformers sdist); deselect with -m 'not download'",
    )
    # Markers that transformers' common model tests (run by tests/model/test_modeling_common.py) put on their tests.
    for marker in (
        "accelerate_tests",
        "flash_attn_test",
        "flash_attn_3_test",
        "flash_attn_4_test",
        "is_training_test",
        "slow",
        "torch_compile_test",
    ):
        config.addinivalue_line("markers", f"{marker}: set by transformers' common model tests")


@pytest.fixture(scope="session")
def tok():
    """The byte tokenizer, built once per session: tests read it and never change it."""
    return byte_tokenizer()
