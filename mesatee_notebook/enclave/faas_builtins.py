"""Built-in functions (issue 17), in the manner of Teaclave's: registered at start, approvable like any other.

Each is a few lines of ordinary Python over the function API (a frame in, plain values out) and runs like any
registered function in a fresh sandboxed executor; the data owners read this source with ``functions.get`` and
approve its digest. They use scikit-learn (the ``ml`` extra) inside the sandbox.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["BUILTINS"]

_LINREG: Final = '''
def main(data, label, features=None):
    """Ordinary least squares of `label` on `features` (default: every other column)."""
    from sklearn.linear_model import LinearRegression

    cols = list(features) if features else [c for c in data.columns if c != label]
    model = LinearRegression().fit(data[cols].to_numpy(float), data[label].to_numpy(float))
    r2 = float(model.score(data[cols].to_numpy(float), data[label].to_numpy(float)))
    return {"features": cols, "coef": [float(c) for c in model.coef_], "intercept": float(model.intercept_),
            "r2": r2, "rows": int(len(data))}
'''

_LOGREG_TRAIN: Final = '''
def main(data, label, features=None, C=1.0, max_iter=200):
    """Logistic regression of the class column `label`; returns the model as plain numbers."""
    from sklearn.linear_model import LogisticRegression

    cols = list(features) if features else [c for c in data.columns if c != label]
    model = LogisticRegression(C=float(C), max_iter=int(max_iter)).fit(data[cols].to_numpy(float), data[label])
    return {"features": cols, "classes": [c.item() if hasattr(c, "item") else c for c in model.classes_],
            "coef": model.coef_.tolist(), "intercept": model.intercept_.tolist(),
            "accuracy": float(model.score(data[cols].to_numpy(float), data[label]))}
'''

_LOGREG_PREDICT: Final = '''
def main(data, model):
    """Class predictions of a logistic_regression_train model (passed as the arg `model`) for every row."""
    import numpy as np
    import pandas as pd

    x = data[list(model["features"])].to_numpy(float)
    scores = x @ np.asarray(model["coef"], float).T + np.asarray(model["intercept"], float)
    if scores.shape[1] == 1:
        picks = (scores[:, 0] > 0).astype(int)
    else:
        picks = scores.argmax(axis=1)
    return pd.DataFrame({"prediction": np.asarray(model["classes"])[picks]})
'''

_PCA: Final = '''
def main(data, n_components=2, features=None):
    """Principal components of the (numeric) columns: components and explained variance, not the rows."""
    from sklearn.decomposition import PCA

    cols = list(features) if features else [c for c in data.columns if data[c].dtype.kind in "iuf"]
    pca = PCA(n_components=int(n_components)).fit(data[cols].to_numpy(float))
    return {"features": cols, "components": pca.components_.tolist(), "mean": pca.mean_.tolist(),
            "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_]}
'''

#: name -> register arguments (the ``function.register`` args plus ``code``)
BUILTINS: Final[dict[str, dict[str, Any]]] = {
    "linear_regression": {
        "code": _LINREG,
        "inputs": ["data"],
        "entry": "main",
        "description": "Built-in: linear regression (scikit-learn). args: label, features?",
    },
    "logistic_regression_train": {
        "code": _LOGREG_TRAIN,
        "inputs": ["data"],
        "entry": "main",
        "description": "Built-in: logistic regression training (scikit-learn). args: label, features?, C?, max_iter?",
    },
    "logistic_regression_predict": {
        "code": _LOGREG_PREDICT,
        "inputs": ["data"],
        "entry": "main",
        "description": "Built-in: logistic regression prediction. args: model",
    },
    "pca": {
        "code": _PCA,
        "inputs": ["data"],
        "entry": "main",
        "description": "Built-in: PCA (scikit-learn). args: n_components?, features?",
    },
}
