# -*- test-case-name: migrate.test.test_codec -*-
"""
The plain-data codec: how protocol state crosses a process boundary.

State that travels with a connection is data, never code: it is encoded as
compact JSON (UTF-8, in fact ASCII) and only the JSON types are accepted
(C{dict} with C{str} keys, C{list}, C{str}, C{int}, C{float}, C{bool},
C{None}; a C{tuple} is accepted and comes back as a C{list}).  Nothing is
ever pickled: a successor must be able to refuse hostile or corrupt state
without running any of it.

Both directions are bounded.  L{encodeState} refuses anything that is not
plain data, naming where it is (C{state['users'][3]: set is not plain
data}), and anything larger than C{maxBytes} once encoded or nested deeper
than C{maxDepth}.  L{decodeState} checks the size before looking at the
bytes, and the nesting depth with a linear scan before parsing, so hostile
input cannot make the parser recurse until Python gives up.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Iterable, NoReturn, Optional, Union

__all__ = [
    "MAX_DEPTH",
    "MAX_STATE_BYTES",
    "StateError",
    "decodeState",
    "encodeState",
    "encodeCheckedState",
    "loadCheckedJSON",
]

MAX_STATE_BYTES = 1 << 20
"""
The default limit on the size of encoded state, in bytes.
"""

MAX_DEPTH = 32
"""
The default limit on how deeply containers (lists and dicts) may nest: a
scalar has depth 0, C{[]} depth 1, C{[{}]} depth 2.
"""

_MAX_INT_BITS = 4096
"""
The largest magnitude an integer may have, in bits.  Bounded so that
decoding an integer costs time linear in its size whatever the
interpreter's integer-string conversion limit is.
"""

_MAX_INT_DIGITS = 1240
"""
More decimal digits than any integer within L{_MAX_INT_BITS} has (1234):
longer digit strings are refused before conversion.
"""

# The exact scalar types of plain data (never their subclasses).
_SCALARS = (str, int, float, bool, type(None))

# A JSON string: from a quote to the next unescaped quote, or to the end of
# the input when unterminated (so that every quote starts at most one scan).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
# An innermost container: an opening bracket right before a closing one.
_INNERMOST = re.compile(rb"[\[{][\]}]")
# Every byte but the four brackets, for bytes.translate(None, ...).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")

_PathNode = Optional[tuple["_PathNode", Union[str, int]]]


class StateError(ValueError):
    """
    Some state is not plain data, is too large or too deeply nested, or is
    not a valid encoding of state.

    The message says where: C{state} is the top of the value, followed by
    the keys and indexes leading to the offending part.
    """


def _shortRepr(value: object, limit: int = 60) -> str:
    """
    Render a key or a scalar for an error message, cut to a bounded length.

    @param value: a C{str} or C{int}, whose C{repr} runs no foreign code.
    @param limit: the longest rendering returned, in characters.

    @return: C{repr(value)}, shortened with an ellipsis if needed.
    """
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _renderPath(node: _PathNode) -> str:
    """
    Render a path to a part of the state, as Python indexing would.

    @param node: the innermost path element, linked to its parents.

    @return: for instance C{"state['users'][3]"}.
    """
    parts: list[str] = []
    while node is not None:
        node, element = node
        parts.append("[" + _shortRepr(element) + "]")
    parts.append("state")
    return "".join(reversed(parts))


def _refuse(node: _PathNode, problem: str) -> NoReturn:
    """
    Raise L{StateError} naming a place in the state.

    @param node: where the problem is.
    @param problem: what is wrong there.

    @raise StateError: always.
    """
    raise StateError(f"{_renderPath(node)}: {problem}")


def _flatAndPlain(value: object, maxBytes: int, maxDepth: int) -> bool:
    """
    The common case, checked quickly: a C{dict} of C{str} keys to scalars
    (C{str}, C{bool}, C{None}, C{int} within the size limit, finite
    C{float}), as most connections' states are.  Checking thousands of
    them is on the path of a freeze, where every client waits.

    @return: C{True} if C{value} is such a dict within the limits;
        C{False} if it is not, or may not be: L{_checkPlain} then walks it
        and says what is wrong, if anything.
    """
    if type(value) is not dict or maxDepth < 1:
        return False
    budget = 2
    for key, item in value.items():
        if type(key) is not str:
            return False
        kind = type(item)
        if kind is str:
            budget += len(key) + len(item) + 6
        elif kind is int:
            if item.bit_length() > _MAX_INT_BITS:
                return False
            budget += len(key) + 4
        elif kind is bool or item is None:
            budget += len(key) + 7
        elif kind is float and math.isfinite(item):
            budget += len(key) + 4
        else:
            return False
    return budget <= maxBytes


def _checkPlain(value: object, *, maxBytes: int, maxDepth: int) -> None:
    """
    Check that C{value} is plain data within the limits, without recursion.

    Only the exact JSON types (and C{tuple}) are accepted, never their
    subclasses: an C{OrderedDict}, an C{IntEnum} or a C{namedtuple} would
    not come back as what it was.  No method of a refused object is called.

    @param value: the candidate state.
    @param maxBytes: refuse values whose encoding is certainly larger.
    @param maxDepth: refuse containers nested deeper than this.

    @raise StateError: naming the first offending place found.
    """
    if _flatAndPlain(value, maxBytes, maxDepth):
        return
    # The walk keeps a lower bound of the encoded size, so that a huge value
    # is refused before being encoded.
    budget = 0
    # Containers being walked (the ancestors of the current value), by id:
    # meeting one again is a cycle.
    ancestors: set[int] = set()
    # Entries are (value, path, depth of enclosing containers), or
    # (None, None, -1 - id) to leave a container once its children are done.
    stack: list[tuple[Any, _PathNode, int]] = [(value, None, 0)]
    while stack:
        current, path, depth = stack.pop()
        if depth < 0:
            ancestors.discard(-1 - depth)
            continue
        kind = type(current)
        if kind in _SCALARS:
            if kind is str:
                budget += len(current) + 2
            elif kind is float:
                budget += 1
                if not math.isfinite(current):
                    _refuse(path, f"float {current!r} is not finite")
            elif kind is int:
                budget += 1
                bits = current.bit_length()
                if bits > _MAX_INT_BITS:
                    _refuse(
                        path,
                        f"int of {bits} bits is larger than the limit of "
                        f"{_MAX_INT_BITS} bits",
                    )
            else:
                budget += 4
        elif kind is dict or kind is list or kind is tuple:
            identity = id(current)
            if identity in ancestors:
                _refuse(path, f"{kind.__name__} contains itself (a cycle)")
            if depth + 1 > maxDepth:
                _refuse(path, f"nested deeper than the limit of {maxDepth} levels")
            ancestors.add(identity)
            stack.append((None, None, -1 - identity))
            budget += 2
            children: Iterable[tuple[Any, _PathNode, int]]
            if kind is dict:
                items = list(current.items())
                for key, _ in items:
                    if type(key) is not str:
                        _refuse(
                            path,
                            f"key of type {type(key).__qualname__} is not a str",
                        )
                    budget += len(key) + 3
                children = ((item, (path, key), depth + 1) for key, item in items)
            else:
                sequence: list[object] = list(current)
                budget += len(sequence)
                children = (
                    (item, (path, index), depth + 1)
                    for index, item in enumerate(sequence)
                )
            # Reversed, so that the first child is looked at first and the
            # first offending place is the one reported.
            stack.extend(reversed(list(children)))
        else:
            _refuse(path, f"{kind.__qualname__} is not plain data")
        if budget > maxBytes:
            raise StateError(
                f"state: encodes to more than the limit of {maxBytes} bytes"
            )


def encodeState(
    value: object, *, maxBytes: int = MAX_STATE_BYTES, maxDepth: int = MAX_DEPTH
) -> bytes:
    """
    Encode plain data as compact JSON.

    @param value: C{dict} with C{str} keys, C{list} or C{tuple}, C{str},
        C{int}, finite C{float}, C{bool} or C{None}, nested.
    @param maxBytes: the largest encoding accepted, in bytes.
    @param maxDepth: the deepest nesting of containers accepted.

    @return: the JSON encoding, UTF-8 (ASCII: non-ASCII characters are
        escaped).

    @raise StateError: if C{value} is not plain data (the message names the
        offending place), contains a cycle, is nested deeper than
        C{maxDepth}, or encodes to more than C{maxBytes}.
    """
    _checkPlain(value, maxBytes=maxBytes, maxDepth=maxDepth)
    try:
        text = json.dumps(
            value,
            ensure_ascii=True,
            allow_nan=False,
            check_circular=False,
            separators=(",", ":"),
        )
    except (ValueError, TypeError, RecursionError) as e:
        # Reachable only through the interpreter's own limits (its
        # integer-string conversion limit, its recursion limit with a huge
        # maxDepth): the walk above has refused everything else.
        raise StateError(f"state: cannot be encoded: {e}") from e
    data = text.encode("ascii")
    if len(data) > maxBytes:
        raise StateError(
            f"state: encodes to {len(data)} bytes, more than the limit of "
            f"{maxBytes} bytes"
        )
    return data


def _compactEncoder() -> Callable[[Any], str]:
    """
    Make the function that encodes plain data already checked: compact
    JSON, ASCII, no C{NaN}, as the codec writes it.

    C{json.JSONEncoder.encode} builds a new C encoder at every call, which
    is most of its cost for a small state, and the C encoder it builds
    keeps a dictionary of every container it enters, to refuse a cycle.
    For what is encoded while every client waits (each connection's
    application state compared at a freeze, the freeze's delta), the C
    encoder is built once here, without the circular-reference check: a
    cycle then fails with C{RecursionError} (which every caller takes as
    a refusal), and the data was checked for cycles as it was captured
    anyway.  Where the C encoder is missing or is called differently, the
    plain encoder does the same work.
    """
    plain = json.JSONEncoder(
        ensure_ascii=True, allow_nan=False, separators=(",", ":")
    ).encode

    def refuse(value: object) -> Any:
        raise TypeError(f"{type(value).__qualname__} is not plain data")

    try:
        from json.encoder import (  # type: ignore[attr-defined]
            c_make_encoder,
            encode_basestring_ascii,
        )

        if c_make_encoder is None:
            return plain
        iterencode = c_make_encoder(
            None, refuse, encode_basestring_ascii, None, ":", ",", False, False, False
        )
        sample = {"a": [1, 2.5, True, None, "\u00e9"]}
        if "".join(iterencode(sample, 0)) != plain(sample):
            return plain
    except Exception:
        return plain

    def encode(value: object) -> str:
        return "".join(iterencode(value, 0))

    return encode


#: encodes plain data already checked, as the codec does (see
#: L{_compactEncoder})
_encodeCompact = _compactEncoder()


def encodeCheckedState(value: object, *, maxBytes: int) -> bytes:
    """
    Encode, as L{encodeState} does, plain data whose every state was
    already checked as it was captured: without walking it again, for a
    step where every client waits (a freeze's delta, re-exec's state
    document).

    @raise StateError: if it cannot be encoded after all, or encodes to
        more than C{maxBytes}.
    """
    try:
        data = _encodeCompact(value).encode("ascii")
    except (TypeError, ValueError, RecursionError) as e:
        raise StateError(f"not plain data: {e}") from e
    if len(data) > maxBytes:
        raise StateError(
            f"encodes to {len(data)} bytes, more than the limit of {maxBytes}"
        )
    return data


def _refuseJSONConstant(name: str) -> Any:
    raise ValueError(f"{name} is not plain data")


def loadCheckedJSON(data: bytes | str, what: str) -> Any:
    """
    Parse JSON written by this process or its predecessor, whose every
    state is then checked on its own (L{migrate.state.ProtocolState.fromPlain}
    and the caller's checks of the structure): JSON's own parser, refusing
    C{NaN} and infinities, not L{decodeState}, whose checks in Python of
    every value cost thousands of waiting clients microseconds each.
    Duplicate keys, which L{decodeState} refuses, are harmless here: the
    last one wins and is checked like any other.

    @param what: names the document in the error.

    @raise StateError: if C{data} is not such JSON (also beyond the
        interpreter's limits: digits of an integer, nesting).
    """
    try:
        return json.loads(data, parse_constant=_refuseJSONConstant)
    except (ValueError, RecursionError) as e:
        raise StateError(f"the {what} is not JSON: {e}") from e


def _checkDepth(data: bytes, maxDepth: int) -> None:
    """
    Refuse JSON nested deeper than C{maxDepth}, before parsing it.

    Strings are removed (their brackets are text), then innermost
    containers are removed, one level per pass: JSON nested C{n} deep is
    gone after C{n} passes.  Each pass is linear and done by the C{re}
    engine, and there are at most C{maxDepth} of them.

    @param data: the candidate JSON, at most the size limit.
    @param maxDepth: the deepest nesting accepted.

    @raise StateError: if the nesting is deeper, or the brackets do not
        balance (which no valid JSON does).
    """
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for _ in range(maxDepth):
        if not brackets:
            return
        inner = _INNERMOST.sub(b"", brackets)
        if len(inner) == len(brackets):
            raise StateError("state: not valid JSON: brackets do not balance")
        brackets = inner
    if brackets:
        raise StateError(f"state: nested deeper than the limit of {maxDepth} levels")


def _parseInt(text: str) -> int:
    """
    Convert a JSON integer, refusing huge ones before conversion.

    @param text: the digits, perhaps with a minus sign.

    @return: the integer.

    @raise StateError: if it is larger than L{_MAX_INT_BITS}.
    """
    if len(text) > _MAX_INT_DIGITS:
        raise StateError(
            f"state: integer of {len(text)} digits is larger than the limit "
            f"of {_MAX_INT_BITS} bits"
        )
    number = int(text)
    if number.bit_length() > _MAX_INT_BITS:
        raise StateError(
            f"state: integer {_shortRepr(number)} is larger than the limit of "
            f"{_MAX_INT_BITS} bits"
        )
    return number


def _parseFloat(text: str) -> float:
    """
    Convert a JSON number with a fraction or exponent, refusing overflow.

    @param text: the number as written.

    @return: the float.

    @raise StateError: if it does not fit a finite float (C{1e999}).
    """
    number = float(text)
    if not math.isfinite(number):
        raise StateError(f"state: number {_shortRepr(text)} is not a finite float")
    return number


def _refuseConstant(text: str) -> NoReturn:
    """
    Refuse C{NaN}, C{Infinity} and C{-Infinity}, which Python's JSON
    parser accepts but which are not JSON.

    @param text: the constant.

    @raise StateError: always.
    """
    raise StateError(f"state: {text} is not plain data")


def _uniqueKeys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """
    Build a JSON object, refusing duplicate keys (which would otherwise
    silently keep the last value).

    @param pairs: the object's members, in order.

    @return: the object as a C{dict}.

    @raise StateError: if a key appears twice.
    """
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StateError(f"state: duplicate key {_shortRepr(key)}")
            seen.add(key)
    return result


def decodeState(
    data: bytes, *, maxBytes: int = MAX_STATE_BYTES, maxDepth: int = MAX_DEPTH
) -> Any:
    """
    Decode state encoded by L{encodeState}.

    @param data: the encoding.
    @param maxBytes: the largest encoding accepted, in bytes; checked
        before anything else.
    @param maxDepth: the deepest nesting of containers accepted; checked
        before parsing.

    @return: plain data: C{dict}, C{list}, C{str}, C{int}, C{float},
        C{bool} or C{None}, nested.

    @raise StateError: if C{data} is not C{bytes}, is too large, is not
        UTF-8, is not JSON, is nested too deeply, or holds what plain data
        cannot (C{NaN}, infinities, huge integers, duplicate keys).
    """
    if not isinstance(data, bytes):
        raise StateError(
            f"state: encoded state must be bytes, not {type(data).__qualname__}"
        )
    if len(data) > maxBytes:
        raise StateError(
            f"state: encoding of {len(data)} bytes is larger than the limit of "
            f"{maxBytes} bytes"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StateError(f"state: not valid UTF-8: {e}") from e
    _checkDepth(data, maxDepth)
    try:
        return json.loads(
            text,
            parse_int=_parseInt,
            parse_float=_parseFloat,
            parse_constant=_refuseConstant,
            object_pairs_hook=_uniqueKeys,
        )
    except StateError:
        raise
    except (ValueError, RecursionError) as e:
        raise StateError(f"state: not valid JSON: {e}") from e
