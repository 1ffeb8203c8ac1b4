"""Source-level fusion for forwards torch.fx cannot follow.

The video VAEs' blocks (diffusers' Wan, QwenImage, ...) take feature caches, lists that their forward
mutates (`feat_cache[idx] = ...; feat_idx[0] += 1`): fx would drop those writes, so fastgen.convert's
traced forwards never run for such calls. Their norm + activation pairs are written as two statements,

    x = self.norm1(x)
    x = self.nonlinearity(x)

and `pair_rewrite` compiles the forward again from its own source with each such pair replaced by
one call, `x = <helper>(self.norm1, self.nonlinearity, x)`; every other statement is the original.
The helper decides at each call whether the pair fuses (the layers' types, hooks, dtypes) and
otherwise calls the two layers as the original did, so the rewritten forward computes what the
original computes for any call. The new function keeps the original's globals (the module's
names, read when it runs), its default objects (`feat_idx=[0]` stays the same list) and its file
and line numbers.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Callable

_HELPER = "__fastgen_pair__"


def _self_call(stmt: ast.stmt, self_name: str):
    """(variable, attribute) for `v = self.attr(v)`, else None."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return None
    call, v = stmt.value, stmt.targets[0].id
    if not (isinstance(call, ast.Call) and not call.keywords and len(call.args) == 1
            and isinstance(call.args[0], ast.Name) and call.args[0].id == v
            and isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
            and call.func.value.id == self_name):
        return None
    return v, call.func.attr


class _Pairs(ast.NodeTransformer):
    def __init__(self, self_name: str, accept: Callable[[str, str], bool]):
        self.self_name, self.accept, self.found = self_name, accept, []

    def generic_visit(self, node):
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                setattr(node, field, self._fuse(stmts))
        return node

    def _fuse(self, stmts: list) -> list:
        out, i = [], 0
        while i < len(stmts):
            first = _self_call(stmts[i], self.self_name)
            second = _self_call(stmts[i + 1], self.self_name) if i + 1 < len(stmts) else None
            if first and second and first[0] == second[0] and self.accept(first[1], second[1]):
                v, s = first[0], self.self_name
                call = ast.Call(ast.Name(_HELPER, ast.Load()),
                                [ast.Attribute(ast.Name(s, ast.Load()), first[1], ast.Load()),
                                 ast.Attribute(ast.Name(s, ast.Load()), second[1], ast.Load()),
                                 ast.Name(v, ast.Load())], [])
                out.append(ast.copy_location(ast.Assign([ast.Name(v, ast.Store())], call), stmts[i]))
                self.found.append((first[1], second[1]))
                i += 2
            else:
                out.append(stmts[i])
                i += 1
        return out


def refusal(forward) -> str:
    """Why a forward cannot be compiled again from its source ('' when it can)."""
    code = getattr(forward, "__code__", None)
    if code is None:
        return "its forward is not a Python function"
    if code.co_freevars:  # a closure, or zero-argument super() (its __class__ cell)
        return "its forward uses a closure or super()"
    try:
        inspect.getsource(forward)
    except (OSError, TypeError):
        return "its forward's source cannot be read"
    return ""


def pair_rewrite(forward, accept: Callable[[str, str], bool], helper: Callable):
    """(the forward compiled again with each accepted `v = self.a(v); v = self.b(v)` as
    helper(self.a, self.b, v), the (a, b) pairs) or (None, []) where there is none or the source
    cannot be compiled again (see `refusal`)."""
    if refusal(forward):
        return None, []
    lines, first_line = inspect.getsourcelines(forward)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef) or fn.decorator_list or not fn.args.args:
        return None, []
    pairs = _Pairs(fn.args.args[0].arg, accept)
    fn = pairs.visit(fn)
    if not pairs.found:
        return None, []
    # def __fastgen_make__(helper): <the forward>; return forward -- the helper a closure variable,
    # so nothing is added to the module's globals, which the function keeps
    maker = ast.FunctionDef(name="__fastgen_make__", args=ast.arguments(
        posonlyargs=[], args=[ast.arg(_HELPER)], kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=[fn, ast.Return(ast.Name(fn.name, ast.Load()))], decorator_list=[], returns=None)
    if "type_params" in ast.FunctionDef._fields:  # Python 3.12+
        maker.type_params = []
    module = ast.fix_missing_locations(ast.Module([maker], type_ignores=[]))
    ast.increment_lineno(module, first_line - 1)
    namespace: dict = {}
    exec(compile(module, inspect.getsourcefile(forward) or "<fastgen>", "exec"), forward.__globals__, namespace)
    new = namespace["__fastgen_make__"](helper)
    new.__defaults__, new.__kwdefaults__ = forward.__defaults__, forward.__kwdefaults__
    new.__qualname__, new.__doc__ = forward.__qualname__, forward.__doc__
    return new, pairs.found
