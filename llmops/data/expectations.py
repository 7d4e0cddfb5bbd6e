"""Custom Great Expectations expectations (registered with GE when this module is imported)."""

from __future__ import annotations

from typing import ClassVar

from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation
from great_expectations.expectations.metrics import ColumnMapMetricProvider, column_condition_partial

from llmops.governance import pii


class ColumnValuesContainNoCheckedPii(ColumnMapMetricProvider):
    condition_metric_name = "column_values.contain_no_checked_pii"
    condition_value_keys = ("kind", "regions")

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column, kind, regions, **kwargs):
        return ~column.map(lambda value: pii.contains(kind, value, tuple(regions))).astype(bool)


class ExpectColumnValuesToContainNoCheckedPii(ColumnMapExpectation):
    """Expect no value to contain PII of a kind a regex alone cannot decide: a payment card number (13-19 digits
    passing the Luhn check), a phone number (valid in libphonenumber's numbering plans), an IBAN or a US social
    security number (valid by python-stdnum)."""

    kind: str
    regions: list[str] = list(pii.PHONE_REGIONS)

    map_metric = "column_values.contain_no_checked_pii"
    success_keys: ClassVar[tuple[str, ...]] = ("kind", "regions", "mostly")
