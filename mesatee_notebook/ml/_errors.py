"""Typed errors of the ML engines (gbdt, treecompile, tvm_runtime).

They hang off the one tree in :mod:`mesatee_notebook.errors`; each leaf also
subclasses the builtin it resembles::

    MesateeError
    ├── MLInputError (ValueError)             data or arguments an engine cannot use
    │   ├── MissingLabel                      the label column is not in the DataFrame
    │   ├── NonNumericFeatures                feature columns that are not numbers (named)
    │   ├── InvalidLabels                     NaN labels, or labels the objective cannot take
    │   ├── FeatureMismatch                   features at predict differ from training
    │   └── InputShapeError                   a tensor's name, shape or dtype does not fit the model
    ├── ModelFormatError (ValueError)         model bytes that cannot be parsed (xgboost JSON, ONNX)
    ├── UnsupportedOperator (NotImplementedError)  ONNX ops the TVM frontend cannot import (named)
    └── CompileError (RuntimeError)           a native compiler (gcc, TVM) failed
        └── CompileTimeout (TimeoutError)     compilation or tuning ran past its timeout

The codes all start with ``ml.`` so the client can rebuild them from the wire
once this module is imported (or map them to the root if it is not).
"""

from __future__ import annotations

from mesatee_notebook.errors import MesateeError

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


class MLInputError(MesateeError, ValueError):
    """Data or arguments an ML engine cannot use."""

    code = "ml.input"


class MissingLabel(MLInputError):
    """The label column named by the caller is not in the DataFrame."""

    code = "ml.input.missing-label"


class NonNumericFeatures(MLInputError):
    """Feature columns that are not numeric; ``details['columns']`` names them."""

    code = "ml.input.non-numeric"


class InvalidLabels(MLInputError):
    """Labels that are NaN or outside what the objective accepts."""

    code = "ml.input.labels"


class FeatureMismatch(MLInputError):
    """Features given at predict time differ from those the model was trained on."""

    code = "ml.input.feature-mismatch"


class InputShapeError(MLInputError):
    """A tensor input whose name, shape or dtype does not fit the compiled model."""

    code = "ml.input.shape"


class ModelFormatError(MesateeError, ValueError):
    """Model bytes that cannot be parsed as the expected format."""

    code = "ml.model-format"


class UnsupportedOperator(MesateeError, NotImplementedError):
    """The model uses operators the compiler cannot import; ``details['ops']`` lists them."""

    code = "ml.unsupported-op"


class CompileError(MesateeError, RuntimeError):
    """A native compiler (gcc through tl2cgen, or TVM) failed."""

    code = "ml.compile"


class CompileTimeout(CompileError, TimeoutError):
    """Compilation or tuning ran past its timeout and was stopped."""

    code = "ml.compile.timeout"
