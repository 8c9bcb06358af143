"""Search filters on ``label`` and on top-level keys of ``desc`` (``params.filter``, beyond Qiniu).

A filter is a JSON object; every entry is one condition and all must hold::

    {"label": "shoes"}                                 label equals
    {"label": {"in": ["shoes", "bags"]}}               label is one of
    {"desc.brand": "acme"}                             desc["brand"] equals (string, number, bool, null)
    {"desc.brand": {"in": ["acme", "bolt"]}}           desc["brand"] is one of
    {"desc.price": {"gte": 10, "lt": 20}}              numeric range: any of gt, gte, lt, lte
    {"desc.size": {"eq": 42}}                          equals, spelled out

A ``desc`` that is not a JSON object has no keys, so it fails every ``desc.`` condition, and so does a
missing key (``{"eq": null}`` matches only a key whose value is null).
Equality is JSON equality: ``1`` and ``1.0`` are equal, ``"1"`` and ``1`` and ``true`` are not.

The stores apply a filter inside the search (SQLite: the matching rows are selected in SQL first and
only they are scanned), so ``limit`` counts images that pass it. :meth:`Filter.matches` is the
reference semantics in Python; :meth:`Filter.sql` must agree with it (tests check both on the same rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tusou.errors import QiniuError

RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
#: At most this many conditions per filter and values per ``in`` list (keeps the SQL bounded).
MAX_CONDITIONS = 16
MAX_IN = 256
MAX_KEY = 128

Scalar = str | int | float | bool | None


class FilterError(QiniuError):
    def __init__(self, detail: str) -> None:
        super().__init__(406, f"invalid filter: {detail}")


@dataclass(frozen=True)
class Condition:
    field: str  # "label" or a desc key
    on_desc: bool
    op: str  # eq, in, gt, gte, lt, lte
    value: Any  # Scalar, a tuple of scalars for "in", a number for ranges


def _scalar(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return v is None or isinstance(v, str | int | bool)


def _same(a: Any, b: Any) -> bool:
    """JSON equality of two scalars: booleans are not numbers, 1 == 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


class Filter:
    def __init__(self, conditions: list[Condition]) -> None:
        self.conditions = tuple(conditions)

    def __repr__(self) -> str:
        return f"Filter({list(self.conditions)!r})"

    @property
    def labels(self) -> frozenset[str] | None:
        """The labels an image must have (from label conditions), None if label is unconstrained."""
        out: set[str] | None = None
        for c in self.conditions:
            if c.on_desc:
                continue
            vals = {c.value} if c.op == "eq" else set(c.value)
            vals = {v for v in vals if isinstance(v, str)}
            out = vals if out is None else out & vals
        return None if out is None else frozenset(out)

    # --- reference semantics -----------------------------------------------------------------------
    def matches(self, label: str, desc: Any) -> bool:
        for c in self.conditions:
            if c.on_desc:
                if not isinstance(desc, dict) or c.field not in desc:
                    return False
                v = desc[c.field]
            else:
                v = label
            if c.op == "eq":
                ok = _scalar(v) and _same(v, c.value)
            elif c.op == "in":
                ok = _scalar(v) and any(_same(v, x) for x in c.value)
            else:
                ok = (
                    isinstance(v, int | float)
                    and not isinstance(v, bool)
                    and _compare(float(v), c.op, float(c.value))
                )
            if not ok:
                return False
        return True

    # --- SQLite --------------------------------------------------------------------------------------
    def sql(self, label_col: str = "label", desc_col: str = '"desc"') -> tuple[str, list[Any]]:
        """A WHERE fragment and its parameters for a table whose desc column holds compact JSON text."""
        parts: list[str] = []
        params: list[Any] = []
        for c in self.conditions:
            if not c.on_desc:
                vals = [c.value] if c.op == "eq" else list(c.value)
                strs = [v for v in vals if isinstance(v, str)]
                if not strs:
                    parts.append("0")
                    continue
                parts.append(f"{label_col} IN ({','.join('?' * len(strs))})")
                params += strs
                continue
            path = '$."' + c.field + '"'  # parse_filter refused quotes and backslashes in keys
            # json_type tells string from number from boolean, which json_extract's value alone cannot.
            typ = f"json_type({desc_col}, ?)"
            val = f"json_extract({desc_col}, ?)"
            if c.op in ("eq", "in"):
                vals = [c.value] if c.op == "eq" else list(c.value)
                alts = []
                for v in vals:
                    if v is None:
                        alts.append(f"{typ} = 'null'")
                        params.append(path)
                    elif isinstance(v, bool):
                        alts.append(f"{typ} = ?")
                        params += [path, "true" if v else "false"]
                    elif isinstance(v, str):
                        alts.append(f"({typ} = 'text' AND {val} = ?)")
                        params += [path, path, v]
                    else:
                        alts.append(f"({typ} IN ('integer', 'real') AND {val} = ?)")
                        params += [path, path, float(v)]
                parts.append("(" + " OR ".join(alts) + ")" if alts else "0")
            else:
                parts.append(f"({typ} IN ('integer', 'real') AND {val} {RANGE_OPS[c.op]} ?)")
                params += [path, path, float(c.value)]
        # json_type of a key of a desc that is no object (or no desc at all) is NULL: no condition holds.
        return (" AND ".join(parts) if parts else "1"), params


def _compare(v: float, op: str, bound: float) -> bool:
    if op == "gt":
        return v > bound
    if op == "gte":
        return v >= bound
    if op == "lt":
        return v < bound
    return v <= bound


def parse_filter(obj: Any) -> Filter | None:
    """``params.filter`` as given by a client -> a Filter (None for no filter); raises FilterError."""
    if obj is None or obj == {}:
        return None
    if not isinstance(obj, dict):
        raise FilterError("expected an object")
    if len(obj) > MAX_CONDITIONS:
        raise FilterError(f"at most {MAX_CONDITIONS} conditions")
    conds: list[Condition] = []
    for key, spec in obj.items():
        if key == "label":
            field, on_desc = "label", False
        elif isinstance(key, str) and key.startswith("desc.") and 0 < len(key) - 5 <= MAX_KEY:
            field, on_desc = key[5:], True
            if any(ch in field for ch in '"\\') or any(ord(ch) < 32 for ch in field):
                raise FilterError(f"{key}: a desc key may not hold quotes, backslashes or control characters")
        else:
            raise FilterError(f"unknown field {key!r} (use label or desc.<key>)")
        if not isinstance(spec, dict):
            spec = {"eq": spec}
        if not spec:
            raise FilterError(f"{key}: empty condition")
        for op, value in spec.items():
            if op == "eq":
                if not _scalar(value):
                    raise FilterError(f"{key}: eq takes a string, number, boolean or null")
                conds.append(Condition(field, on_desc, "eq", value))
            elif op == "in":
                if not isinstance(value, list) or not value or len(value) > MAX_IN:
                    raise FilterError(f"{key}: in takes a list of 1 to {MAX_IN} values")
                if not all(_scalar(v) for v in value):
                    raise FilterError(f"{key}: in takes strings, numbers, booleans or null")
                conds.append(Condition(field, on_desc, "in", tuple(value)))
            elif op in RANGE_OPS:
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise FilterError(f"{key}: {op} takes a number")
                if not on_desc:
                    raise FilterError("label takes eq or in")
                conds.append(Condition(field, on_desc, op, value))
            else:
                raise FilterError(f"{key}: unknown operator {op!r} (eq, in, gt, gte, lt, lte)")
    return Filter(conds)
