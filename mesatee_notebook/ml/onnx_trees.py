"""ONNX tree ensembles (``ai.onnx.ml`` ``TreeEnsembleRegressor`` / ``TreeEnsembleClassifier``) as treelite models.

treelite has no ONNX importer, so this module reads the node's attributes and rebuilds the trees with
treelite's public model builder (``treelite.model_builder.ModelBuilder``); ``ml/onnx_treelib.py`` compiles
them with the compiled-tree path's toolchain (tl2cgen + gcc, as for xgboost models in ``treecompile.py``).

What is taken (the graphs skl2onnx emits for GradientBoosting / RandomForest / DecisionTree regressors and
classifiers): one float 2-D input feeding one tree-ensemble node, followed only by ``ZipMap``, ``Cast`` or
``Identity``; split modes ``BRANCH_LEQ/LT/GTE/GT/EQ/NEQ`` and ``LEAF``; ``nodes_missing_value_tracks_true``
(a NaN goes to the true branch, or the false branch; ``NEQ`` sends NaN to the true branch, as onnxruntime
does); ``base_values``; ``aggregate_function`` ``SUM``/``AVERAGE``; ``post_transform`` ``NONE``/
``LOGISTIC``/``SOFTMAX``; integer class labels. Anything else (double thresholds, string labels, ``MIN``/
``MAX``, ``PROBIT``, ``SOFTMAX_ZERO``, other operators) raises :class:`UnsupportedOperator` with the reason,
and ``engine="auto"`` then keeps the graph on onnxruntime.

The trees give raw scores (sum, or average, plus ``base_values``: both inside the treelite model). The
post-transform and the label are applied here in numpy, following onnxruntime's ``TreeEnsembleClassifier``
(including its binary case: one score column becomes two probabilities). Before a compiled library is used
it must reproduce onnxruntime's outputs on probe rows built from the split thresholds (``onnx_treelib.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from typing import Any, Literal, NoReturn

import numpy as np
import numpy.typing as npt

from mesatee_notebook.ml._errors import UnsupportedOperator

__all__ = ["ENGINE", "TreeGraph", "build_treelite", "finalize", "parse_tree_graph"]

ENGINE = "treelite"
_TREE_OPS = ("TreeEnsembleRegressor", "TreeEnsembleClassifier")
_AFTER_OPS = frozenset({"ZipMap", "Cast", "Identity"})
#: ONNX mode -> (treelite operator, branches swapped). NEQ is ``==`` with the children swapped.
_MODES: dict[str, tuple[str, bool]] = {
    "BRANCH_LEQ": ("<=", False),
    "BRANCH_LT": ("<", False),
    "BRANCH_GTE": (">=", False),
    "BRANCH_GT": (">", False),
    "BRANCH_EQ": ("==", False),
    "BRANCH_NEQ": ("==", True),
}
_POSTS = frozenset({"NONE", "LOGISTIC", "SOFTMAX"})
_CAST_DTYPES = {1: "float32", 6: "int32", 7: "int64", 11: "float64"}
Role = Literal["label", "scores"]
F32: Any = np.float32


def _refuse(reason: str) -> NoReturn:
    msg = f"the treelite engine cannot take this graph: {reason}"
    raise UnsupportedOperator(msg, engine=ENGINE)


@dataclasses.dataclass(frozen=True)
class Node:
    """One tree node: a split (``op`` set) or a leaf (``leaf`` set, length = outputs)."""

    key: int
    feature: int = 0
    threshold: float = 0.0
    op: str | None = None
    left: int = -1
    right: int = -1
    default_left: bool = False
    leaf: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class TreeGraph:
    """A parsed tree-ensemble graph: the trees, how scores become outputs, and the graph's output names."""

    input_name: str
    num_features: int
    classifier: bool
    width: int  # score columns the trees produce (classes, targets, or 1 in the binary case)
    trees: tuple[tuple[Node, ...], ...]  # each tree's nodes, root first
    base: tuple[float, ...]
    average: bool
    post: str
    binary: str | None  # classifier with one score column: "positive" weights or "mixed"
    labels: tuple[int, ...]
    scored: tuple[bool, ...]  # classes that receive any score (argmax skips the others, like onnxruntime)
    outputs: tuple[tuple[str, Role, str], ...]  # (graph output name, role, dtype), in graph order

    @functools.cached_property
    def label_array(self) -> npt.NDArray[np.int64]:
        """The class labels as an array (indexed by the winning score column)."""
        return np.asarray(self.labels, dtype=np.int64)

    @property
    def out_columns(self) -> int:
        """Columns of the probabilities / values output."""
        return 2 if self.binary else self.width


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[attr.name] = value
    return out


def _split_graph(model: Any) -> tuple[Any, Any, list[Any]]:
    """(the input, the tree node, the nodes after it); refused unless the graph has exactly that shape."""
    graph = model.graph
    init = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]
    if len(inputs) != 1:
        _refuse(f"it has {len(inputs)} inputs; one feature matrix only")
    trees = [n for n in graph.node if n.op_type in _TREE_OPS and n.domain == "ai.onnx.ml"]
    if len(trees) != 1:
        _refuse("it needs exactly one TreeEnsembleRegressor/TreeEnsembleClassifier node")
    tree = trees[0]
    if list(tree.input) != [inputs[0].name]:
        _refuse("the tree ensemble must read the graph's input directly (no preprocessing)")
    rest = [n for n in graph.node if n is not tree]
    bad = sorted({n.op_type for n in rest if n.op_type not in _AFTER_OPS})
    if bad:
        _refuse(f"operators {', '.join(bad)} besides the tree ensemble (ZipMap, Cast, Identity only)")
    elem = inputs[0].type.tensor_type.elem_type
    if elem != 1:
        _refuse("its input is not a float tensor")
    return inputs[0], tree, rest


def _trace_outputs(model: Any, tree: Any, rest: list[Any], classifier: bool) -> tuple[tuple[str, Role, str], ...]:
    """Follow ZipMap/Cast/Identity from the tree's outputs to the graph's outputs."""
    roles: dict[str, tuple[Role, str]] = {}
    names = list(tree.output)
    if classifier:
        roles[names[0]] = ("label", "int64")
        if len(names) > 1:
            roles[names[1]] = ("scores", "float32")
    else:
        roles[names[0]] = ("scores", "float32")
    pending = list(rest)
    while pending:
        progress = False
        for node in list(pending):
            if len(node.input) != 1 or node.input[0] not in roles:
                continue
            role, dtype = roles[node.input[0]]
            if node.op_type == "Cast":
                dtype = _CAST_DTYPES.get(int(_attrs(node).get("to", 0)), "")
                if not dtype:
                    _refuse("a Cast to a type other than float, double, int32 or int64")
            elif node.op_type == "ZipMap":
                dtype = "float32"
            roles[node.output[0]] = (role, dtype)
            pending.remove(node)
            progress = True
        if not progress:
            _refuse("a node after the tree ensemble does not read its outputs")
    out = []
    for o in model.graph.output:
        if o.name not in roles:
            _refuse(f"graph output {o.name!r} does not come from the tree ensemble")
        out.append((o.name, *roles[o.name]))
    return tuple(out)


def _weights(a: dict[str, Any], classifier: bool) -> tuple[list[int], list[int], list[int], list[float]]:
    pre = "class" if classifier else "target"
    keys = (f"{pre}_treeids", f"{pre}_nodeids", f"{pre}_ids", f"{pre}_weights")
    tids, nids, ids, ws = (list(a.get(k, [])) for k in keys)
    if not (len(tids) == len(nids) == len(ids) == len(ws)):
        _refuse(f"the {pre}_* attributes have different lengths")
    return [int(t) for t in tids], [int(n) for n in nids], [int(i) for i in ids], [float(w) for w in ws]


def _check_attrs(a: dict[str, Any]) -> None:
    tensors = sorted(k for k in a if k.endswith("_as_tensor"))
    if tensors:
        _refuse(f"double-precision attributes ({', '.join(tensors)})")
    if a.get("classlabels_strings"):
        _refuse("string class labels")
    if str(a.get("post_transform", "NONE")) not in _POSTS:
        _refuse(f"post_transform {a.get('post_transform')} (NONE, LOGISTIC, SOFTMAX only)")
    if str(a.get("aggregate_function", "SUM")) not in ("SUM", "AVERAGE"):
        _refuse(f"aggregate_function {a.get('aggregate_function')} (SUM, AVERAGE only)")


_FMAX = float(np.finfo(np.float32).max)
#: Tests against an infinite threshold as finite ones: tl2cgen's code generator folds them assuming finite
#: inputs (``x < inf`` becomes true), which is wrong for an input of inf; sklearn puts inf thresholds on
#: splits that separate missing values.
_INF_TESTS = {
    ("<", 1): ("<=", _FMAX),
    (">=", 1): (">", _FMAX),
    ("==", 1): (">", _FMAX),
    (">", -1): (">=", -_FMAX),
    ("<=", -1): ("<", -_FMAX),
    ("==", -1): ("<", -_FMAX),
}


def _finite(op: str, threshold: float) -> tuple[str, float]:
    if not np.isinf(threshold):
        return op, threshold
    return _INF_TESTS.get((op, 1 if threshold > 0 else -1), (op, threshold))


def _build_nodes(a: dict[str, Any], leaf_of: dict[tuple[int, int], list[float]], width: int, n_features: int) -> Any:
    """Per tree id: its nodes keyed by node id."""
    cols = ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes")
    tids, nids, feats, vals, modes = (list(a.get(k, [])) for k in cols)
    true_ids, false_ids = list(a.get("nodes_truenodeids", [])), list(a.get("nodes_falsenodeids", []))
    tracks = list(a.get("nodes_missing_value_tracks_true", [])) or [0] * len(tids)
    if not tids or len({len(x) for x in (tids, nids, feats, vals, modes, true_ids, false_ids, tracks)}) != 1:
        _refuse("the nodes_* attributes are missing or have different lengths")
    trees: dict[int, dict[int, Node]] = {}
    for i, (tid, nid, mode) in enumerate(zip(tids, nids, modes, strict=True)):
        t, n = int(tid), int(nid)
        if mode == "LEAF":
            node = Node(n, leaf=tuple(leaf_of.get((t, n), [0.0] * width)))
        elif mode in _MODES:
            feature = int(feats[i])
            if not 0 <= feature < n_features:
                _refuse(f"a split reads feature {feature}; the input has {n_features}")
            op, swap = _MODES[mode]
            op, threshold = _finite(op, float(vals[i]))
            yes, no = int(true_ids[i]), int(false_ids[i])
            # A NaN fails every comparison: it goes to the true branch only if tracked (NEQ: always true).
            nan_true = bool(tracks[i]) or mode == "BRANCH_NEQ"
            left, right = (no, yes) if swap else (yes, no)
            node = Node(n, feature, threshold, op, left, right, default_left=nan_true != swap)
        else:
            _refuse(f"node mode {mode}")
        if n in trees.setdefault(t, {}):
            _refuse(f"tree {t} has node id {n} twice")
        trees[t][n] = node
    return trees


def _order(tree_id: int, nodes: dict[int, Node]) -> tuple[Node, ...]:
    """The tree's nodes reachable from its root (the node no other node points to), root first."""
    children = {c for nd in nodes.values() if nd.op is not None for c in (nd.left, nd.right)}
    roots = [k for k in nodes if k not in children]
    missing = sorted(children - set(nodes))
    if len(roots) != 1 or missing:
        _refuse(f"tree {tree_id} is not a tree (roots {roots[:3]}, unknown children {missing[:3]})")
    out, seen, todo = [], set(), deque([roots[0]])
    while todo:
        key = todo.popleft()
        if key in seen:
            _refuse(f"tree {tree_id} has a cycle or a shared node")
        seen.add(key)
        nd = nodes[key]
        out.append(nd)
        if nd.op is not None:
            todo.extend((nd.left, nd.right))
    return tuple(out)


def _classes(a: dict[str, Any], ids: list[int], ws: list[float], post: str) -> tuple[tuple[int, ...], str | None, int]:
    labels = tuple(int(v) for v in a.get("classlabels_int64s", []))
    if len(labels) < 2 or (ids and not 0 <= min(ids) <= max(ids) < len(labels)):
        _refuse("class ids do not index the integer class labels")
    used = set(ids)
    if len(labels) != 2:
        return labels, None, len(labels)
    if len(used) != 1:
        _refuse("two classes scored separately (onnxruntime's 'binary as multiclass' case)")
    positive = all(w >= 0 for w in ws)
    if positive and post != "NONE":
        _refuse(f"a binary classifier with only positive weights and post_transform {post}")
    if post == "SOFTMAX":
        _refuse("a binary classifier with post_transform SOFTMAX")
    return labels, "positive" if positive else "mixed", 1


def parse_tree_graph(model: Any, num_features: int) -> TreeGraph:
    """Read a tree-ensemble ``ModelProto`` for an input with ``num_features`` columns; refused with the reason."""
    inp, tree, rest = _split_graph(model)
    a = _attrs(tree)
    _check_attrs(a)
    classifier = tree.op_type == "TreeEnsembleClassifier"
    post = str(a.get("post_transform", "NONE"))
    tids, nids, ids, ws = _weights(a, classifier)
    if classifier:
        labels, binary, width = _classes(a, ids, ws, post)
        if binary:
            ids = [0] * len(ids)
    else:
        labels, binary, width = (), None, int(a.get("n_targets", 1))
        if ids and not 0 <= min(ids) <= max(ids) < width:
            _refuse("target ids outside n_targets")
    leaf_of: dict[tuple[int, int], list[float]] = {}
    for t, n, k, w in zip(tids, nids, ids, ws, strict=True):
        leaf_of.setdefault((t, n), [0.0] * width)[k] += w
    trees = _build_nodes(a, leaf_of, width, num_features)
    base = tuple(float(b) for b in a.get("base_values", []))
    if base and len(base) != width:
        _refuse(f"{len(base)} base_values for {width} score columns")
    outputs = _trace_outputs(model, tree, rest, classifier)
    return TreeGraph(
        input_name=inp.name,
        num_features=num_features,
        classifier=classifier,
        width=width,
        trees=tuple(_order(t, trees[t]) for t in sorted(trees)),
        base=base or (0.0,) * width,
        average=str(a.get("aggregate_function", "SUM")) == "AVERAGE",
        post=post,
        binary=binary,
        labels=labels,
        scored=tuple(bool(base) or k in set(ids) for k in range(width)),
        outputs=outputs,
    )


def _per_tree_class(graph: TreeGraph) -> list[int] | None:
    """The one score column each tree adds to, if every tree adds to one column only (then leaves are scalars)."""
    if graph.width == 1:
        return [0] * len(graph.trees)
    if graph.average:  # treelite averages per column over the trees of that column; onnxruntime over all trees
        return None
    out = []
    for tree in graph.trees:
        cols = {k for nd in tree if nd.op is None for k, v in enumerate(nd.leaf) if v != 0.0}
        if len(cols) > 1:
            return None
        out.append(min(cols) if cols else 0)
    return out


def build_treelite(graph: TreeGraph) -> Any:
    """The trees as a ``treelite.Model`` (float32 thresholds and leaves; raw scores, no postprocessor)."""
    from treelite.model_builder import Metadata, ModelBuilder, PostProcessorFunc, TreeAnnotation

    per_tree = _per_tree_class(graph)
    scalar = per_tree is not None
    multi = graph.width > 1
    builder: Any = ModelBuilder(
        threshold_type="float32",
        leaf_output_type="float32",
        metadata=Metadata(
            num_feature=graph.num_features,
            task_type="kMultiClf" if multi else "kRegressor",
            average_tree_output=graph.average,
            num_target=1,
            num_class=[graph.width],
            leaf_vector_shape=(1, 1 if scalar else graph.width),
        ),
        tree_annotation=TreeAnnotation(
            num_tree=len(graph.trees),
            target_id=[0] * len(graph.trees),
            class_id=per_tree if per_tree is not None else [-1] * len(graph.trees),
        ),
        postprocessor=PostProcessorFunc(name="identity_multiclass" if multi else "identity"),
        base_scores=list(graph.base),
    )
    for t, tree in enumerate(graph.trees):
        builder.start_tree()
        for nd in tree:
            builder.start_node(nd.key)
            if nd.op is None:
                builder.leaf(nd.leaf[per_tree[t]] if per_tree is not None else list(nd.leaf))
            else:
                builder.numerical_test(
                    feature_id=nd.feature,
                    threshold=nd.threshold,
                    default_left=nd.default_left,
                    opname=nd.op,
                    left_child_key=nd.left,
                    right_child_key=nd.right,
                )
            builder.end_node()
        builder.end_tree()
    return builder.commit()


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float32)


def _transform(scores: npt.NDArray[np.float32], post: str) -> npt.NDArray[np.float32]:
    if post == "LOGISTIC":
        return _sigmoid(scores)
    if post == "SOFTMAX":
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        return np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float32)
    return scores


def finalize(graph: TreeGraph, raw: npt.NDArray[np.float32]) -> dict[str, np.ndarray]:
    """The graph's outputs from the trees' raw scores ``(rows, width)``, as onnxruntime computes them."""
    scores = raw.reshape(raw.shape[0], graph.width).astype(np.float32, copy=False)
    label_idx: npt.NDArray[np.intp]
    if graph.binary is not None:
        s = scores[:, 0]
        if graph.binary == "positive":  # onnxruntime: [1 - s, s], positive if s > 0.5
            values = np.stack([F32(1.0) - s, s], axis=1)
            label_idx = (s > F32(0.5)).astype(np.intp)
        else:  # mixed weights: [-s, s] or [sigmoid(-s), sigmoid(s)], positive if s > 0
            values = (
                np.stack([-s, s], axis=1) if graph.post == "NONE" else np.stack([_sigmoid(-s), _sigmoid(s)], axis=1)
            )
            label_idx = (s > 0).astype(np.intp)
    else:
        values = _transform(scores, graph.post)
        masked = scores if all(graph.scored) else np.where(np.asarray(graph.scored)[None, :], scores, -np.inf)
        label_idx = masked.argmax(axis=1)
    out: dict[str, np.ndarray] = {}
    for name, role, dtype in graph.outputs:
        if role == "label":
            out[name] = graph.label_array.take(label_idx).astype(dtype, copy=False)
        else:
            out[name] = values.astype(dtype, copy=False)
    return out
