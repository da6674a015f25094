"""pandas ``query``/``eval`` strings as remote expressions: a safe subset parsed on the client, no code runs."""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING, Any, NoReturn, cast

from mesatee_notebook.errors import FrameUsageError
from mesatee_notebook.remote.frame_base import Node, Operand, _lit_or_node
from mesatee_notebook.remote.frame_series import SecureSeries
from mesatee_notebook.wire.ops import Binary

if TYPE_CHECKING:
    from mesatee_notebook.remote.frame import SecureDataFrame

_ARITH = {
    ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "truediv", ast.FloorDiv: "floordiv",
    ast.Mod: "mod", ast.Pow: "pow", ast.BitAnd: "and", ast.BitOr: "or", ast.BitXor: "xor",
}  # fmt: skip
_COMPARE = {ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge"}


def _operand_of(value: Any) -> Operand:
    if isinstance(value, Node):
        return value
    return _lit_or_node(value)


def _as_series(frame: SecureDataFrame, value: Any, what: str) -> SecureSeries:
    if isinstance(value, SecureSeries):
        return value
    if isinstance(value, Node):
        return SecureSeries(value, frame._ctx)
    msg = f"{what}(): the expression must involve a column"
    raise FrameUsageError(msg)


class _Parser:
    """One ``query``/``eval`` string: each supported Python syntax node becomes a remote expression."""

    def __init__(self, frame: SecureDataFrame, text: str, what: str) -> None:
        self.frame, self.text, self.what = frame, text, what

    def bad(self, node: ast.AST) -> NoReturn:
        msg = (
            f"{self.what}(): {type(node).__name__} is not supported in {self.text!r}; use column names, literals, "
            "arithmetic, comparisons, in/not in [...], and/or/not, & | ~"
        )
        raise FrameUsageError(msg)

    def lit(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and not isinstance(node.value, (bytes, complex, type(...))):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -cast("float", node.operand.value)
        self.bad(node)

    def ev(self, node: ast.AST) -> Any:
        visit = getattr(self, f"ev_{type(node).__name__}", None)
        if visit is None:
            self.bad(node)
        return visit(node)

    def ev_Name(self, node: ast.Name) -> Any:
        if node.id not in self.frame.columns:
            msg = f"{self.what}(): no column {node.id!r} (columns: {', '.join(self.frame._visible())})"
            raise FrameUsageError(msg)
        return self.frame[node.id]

    def ev_Constant(self, node: ast.Constant) -> Any:
        return self.lit(node)

    def ev_BinOp(self, node: ast.BinOp) -> Any:
        if type(node.op) not in _ARITH:
            self.bad(node)
        return Binary(_ARITH[type(node.op)], _operand_of(self.ev(node.left)), _operand_of(self.ev(node.right)))

    def ev_BoolOp(self, node: ast.BoolOp) -> Any:
        values = [self.ev(v) for v in node.values]
        logic = "and" if isinstance(node.op, ast.And) else "or"
        out = values[0]
        for v in values[1:]:
            out = Binary(logic, _operand_of(out), _operand_of(v))
        return out

    def ev_UnaryOp(self, node: ast.UnaryOp) -> Any:
        inner = _as_series(self.frame, self.ev(node.operand), self.what)
        if isinstance(node.op, (ast.Not, ast.Invert)):
            return ~inner
        if isinstance(node.op, ast.USub):
            return -inner
        self.bad(node)

    def _compare_one(self, left: Any, cop: ast.cmpop, right_node: ast.expr) -> tuple[Any, Any]:
        """One link ``left <cop> right`` of a comparison chain: (its boolean series, the new left operand)."""
        if isinstance(cop, (ast.In, ast.NotIn)):
            if not isinstance(right_node, (ast.List, ast.Tuple, ast.Set)):
                self.bad(right_node)
            part = _as_series(self.frame, left, self.what).isin([self.lit(e) for e in right_node.elts])
            return (~part if isinstance(cop, ast.NotIn) else part), None
        if type(cop) not in _COMPARE:
            self.bad(cop)
        right = self.ev(right_node)
        return Binary(_COMPARE[type(cop)], _operand_of(left), _operand_of(right)), right

    def ev_Compare(self, node: ast.Compare) -> Any:
        left = self.ev(node.left)
        out: Any = None
        for cop, right_node in zip(node.ops, node.comparators, strict=True):
            part, left = self._compare_one(left, cop, right_node)
            out = part if out is None else Binary("and", _operand_of(out), _operand_of(part))
        return out


def parse_expr(frame: SecureDataFrame, text: str, what: str) -> SecureSeries:
    """Build a remote expression from a pandas ``query``/``eval`` string (a safe subset, no code runs)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        msg = f"{what}(): cannot parse {text!r}: {exc.msg}"
        raise FrameUsageError(msg) from None
    parser = _Parser(frame, text, what)
    return _as_series(frame, parser.ev(tree.body), what)
