"""The tiny model fixture of the attention and packing tests (tests/unit/core/packed_rows.py)."""

from tests.unit.core.packed_rows import tiny_model  # noqa: F401 (a fixture)
