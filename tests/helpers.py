"""Helpers shared by the tests (import from here, not from conftest)."""
from mari_fx.testing.examples import mlp  # noqa: F401 (one MLP builder for models, tests and bench)
from mari_fx.report.verify import ragged_index  # noqa: F401 (shuffled ragged user_index, as random_request draws)
