"""Typed errors of the ML engines, re-exported from :mod:`mesatee_notebook.errors`.

They live in the one error tree so the supervisor and the client rebuild them from their
wire codes (``ml.*``) without importing the engines.
"""

from __future__ import annotations

from mesatee_notebook.errors import (
    CompileError,
    CompileTimeout,
    FeatureMismatch,
    InputShapeError,
    InvalidLabels,
    MissingLabel,
    MLInputError,
    ModelFormatError,
    NonNumericFeatures,
    UnsupportedOperator,
)

__all__ = [
    "CompileError",
    "CompileTimeout",
    "FeatureMismatch",
    "InputShapeError",
    "InvalidLabels",
    "MLInputError",
    "MissingLabel",
    "ModelFormatError",
    "NonNumericFeatures",
    "UnsupportedOperator",
]
