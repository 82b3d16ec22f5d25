"""benchmarks.quality_suite: bad settings of the suite and of a run name the field."""

import pytest

from benchmarks.quality_suite import RunSpec, SuiteConfig


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="steps"):
        SuiteConfig(steps=0)
    with pytest.raises(ValueError, match="probe_len"):
        SuiteConfig(probe_len=64, block_size=64)
    with pytest.raises(ValueError, match="attention"):
        RunSpec("x", attention="flash")
    with pytest.raises(ValueError, match="task"):
        RunSpec("x", task="mlm")
    with pytest.raises(ValueError, match="steps"):
        RunSpec("x", steps=0)
    with pytest.raises(ValueError, match="probe_len"):
        RunSpec("x", probe_len=4096)
