"""Reading a model config (config.json of a checkpoint) that is damaged: a config or a clear input error."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.errors import InputError
from lmforge.model import ModelConfig, preset


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**5), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 10**5))
def test_a_damaged_config_json_gives_a_config_or_an_input_error(tmp_path, flips, cut):
    """The model config read from a checkpoint (ModelConfig.load), its bytes damaged: a config or lmforge's input
    error naming the file (invalid JSON, not UTF-8, not an object, unknown or invalid fields)."""
    data = bytearray(json.dumps(dataclasses.asdict(preset("tiny", vocab_size=64))).encode())
    for at, value in flips:
        data[at % len(data)] = value
    path = tmp_path / "config.json"
    path.write_bytes(bytes(data[:max(1, len(data) - cut % len(data))]))
    try:
        ModelConfig.load(path)
    except InputError as err:
        assert str(path) in str(err)
