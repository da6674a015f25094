"""Fixtures for the ML engine tests: synthetic data and ONNX models built in code."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_frame(rows: int = 600, seed: int = 0) -> pd.DataFrame:
    """Numeric features with some NaNs, plus binary, multiclass and regression targets."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(rows, 6)), columns=[f"x{i}" for i in range(6)])
    frame.loc[rng.random(rows) < 0.05, "x2"] = np.nan
    frame["flag"] = rng.random(rows) < 0.3
    x0, x1 = frame["x0"].to_numpy(), frame["x1"].to_numpy()
    frame["binary"] = ((x0 + x1**2 + rng.normal(scale=0.3, size=rows)) > 1).astype(int)
    frame["klass"] = np.digitize(x0 + 0.5 * x1, [-0.7, 0.0, 0.7])
    frame["target"] = 3 * x0 - 2 * np.abs(x1) + rng.normal(scale=0.2, size=rows)
    return frame


FEATURES = [f"x{i}" for i in range(6)] + ["flag"]


@pytest.fixture
def frame() -> pd.DataFrame:
    return make_frame()


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    """A 64 -> 256 -> 256 -> 10 MLP with Gemm and Relu, symbolic batch."""
    rng = np.random.default_rng(seed)
    dims = [64, 256, 256, 10]
    nodes, inits, cur = [], [], "x"
    for i in range(3):
        weight = (rng.normal(size=(dims[i], dims[i + 1])) * 0.1).astype(np.float32)
        bias = (rng.normal(size=dims[i + 1]) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"W{i}"), numpy_helper.from_array(bias, f"B{i}")]
        nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"B{i}"], [f"h{i}"]))
        cur = f"h{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def cnn_model(seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu-GlobalAveragePool-Flatten-Gemm-Softmax on (N, 3, 16, 16).

    Two outputs: the probabilities and the logits ``z`` before the softmax.
    """
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.normal(size=shape) * 0.2).astype(np.float32), name)

    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 16, 8, 3, 3), init("b2", 16)]
    inits += [init("wf", 16, 10), init("bf", 10)]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 10]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def single_op_model(op: str, domain: str = "", **attrs: object) -> onnx.ModelProto:
    """A one-node model y = op(x) on a (4, 8) float input."""
    node = helper.make_node(op, ["x"], ["y"], domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feeds)]
