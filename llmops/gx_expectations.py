"""Custom Great Expectations expectations (registered with GE when this module is imported)."""

from __future__ import annotations

from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation
from great_expectations.expectations.metrics import ColumnMapMetricProvider, column_condition_partial

from llmops import pii


class ColumnValuesContainNoCardNumber(ColumnMapMetricProvider):
    condition_metric_name = "column_values.contain_no_card_number"

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column, **kwargs):
        return ~column.map(lambda value: pii.contains("card", value)).astype(bool)


class ExpectColumnValuesToContainNoCardNumber(ColumnMapExpectation):
    """Expect no value to contain a payment card number (13-19 digits passing the Luhn check)."""

    map_metric = "column_values.contain_no_card_number"
