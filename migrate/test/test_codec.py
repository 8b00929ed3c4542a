"""
Tests for L{migrate._codec}, the plain-data codec.
"""

from __future__ import annotations

import collections
import enum
import json
import pickle
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from migrate import _codec
from migrate._codec import (
    MAX_DEPTH,
    MAX_STATE_BYTES,
    StateError,
    decodeState,
    encodeCheckedState,
    encodeState,
)

_EXAMPLES = settings(max_examples=200, deadline=None)

# Plain data as it comes back from decoding (lists, not tuples).
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**4096) + 1, max_value=2**4096 - 1)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
plainData = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=25,
)


def _depth(value: object) -> int:
    """
    @return: how deeply containers nest in C{value} (a scalar: 0).
    """
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _tuplify(value: Any, flip: bool) -> Any:
    """
    @return: C{value} with some of its lists turned into tuples.
    """
    if isinstance(value, list):
        items = [_tuplify(item, not flip) for item in value]
        return tuple(items) if flip else items
    if isinstance(value, dict):
        return {key: _tuplify(item, not flip) for key, item in value.items()}
    return value


def _nested(depth: int) -> list[Any]:
    """
    @return: C{depth} lists, each in the previous one (built without
        recursion).
    """
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


class _Color(enum.IntEnum):
    red = 1


class _Point(NamedTuple):
    x: int
    y: int


class _Text(str):
    pass


class EncodeCheckedTests(SynchronousTestCase):
    """
    L{encodeCheckedState} encodes checked data as L{encodeState} does,
    within its bound.
    """

    def test_sameEncoding(self) -> None:
        value = {"count": 3, "names": ["a", "\u00e9"], "f": 1.5, "n": None}
        self.assertEqual(encodeCheckedState(value, maxBytes=1000), encodeState(value))

    def test_refused(self) -> None:
        """
        Not JSON (C{NaN}, bytes), or over the bound: L{StateError}.
        """
        for value in ({"x": float("nan")}, {"x": b"1"}):
            self.assertRaises(StateError, encodeCheckedState, value, maxBytes=100)
        error = self.assertRaises(
            StateError, encodeCheckedState, {"x": "y" * 50}, maxBytes=20
        )
        self.assertIn("more than the limit of 20", str(error))

    def test_cycle(self) -> None:
        """
        A container that contains itself is refused with L{StateError}, as
        is an object JSON has no form for.
        """
        cycle: list[Any] = []
        cycle.append(cycle)
        mapping: dict[str, Any] = {}
        mapping["self"] = [mapping]
        for value in (cycle, mapping, {"x": {1, 2}}, {"x": object()}):
            self.assertRaises(
                StateError, encodeCheckedState, value, maxBytes=MAX_STATE_BYTES
            )


class RoundTripTests(SynchronousTestCase):
    """
    What L{encodeState} encodes, L{decodeState} gives back.
    """

    @_EXAMPLES
    @given(plainData)
    def test_roundTrip(self, value: Any) -> None:
        """
        Plain data comes back equal.
        """
        limits = dict(maxBytes=1 << 24, maxDepth=1000)
        self.assertEqual(decodeState(encodeState(value, **limits), **limits), value)

    @_EXAMPLES
    @given(plainData, st.booleans())
    def test_tuplesBecomeLists(self, value: Any, flip: bool) -> None:
        """
        Tuples are accepted and come back as lists.
        """
        limits = dict(maxBytes=1 << 24, maxDepth=1000)
        encoded = encodeState(_tuplify(value, flip), **limits)
        self.assertEqual(encoded, encodeState(value, **limits))
        self.assertEqual(decodeState(encoded, **limits), value)

    @_EXAMPLES
    @given(plainData)
    def test_encodingIsJSON(self, value: Any) -> None:
        """
        The encoding is compact JSON in ASCII, which any JSON parser reads.
        """
        encoded = encodeState(value, maxBytes=1 << 24, maxDepth=1000)
        self.assertIsInstance(encoded, bytes)
        text = encoded.decode("ascii")
        self.assertEqual(json.loads(text), value)

    def test_compact(self) -> None:
        """
        No spaces are spent between items.
        """
        self.assertEqual(
            encodeState({"a": [1, 2.5, None, True, "\u00e9"]}),
            b'{"a":[1,2.5,null,true,"\\u00e9"]}',
        )

    def test_loneSurrogate(self) -> None:
        """
        A C{str} holding a lone surrogate (which UTF-8 cannot encode) is
        escaped, and comes back.
        """
        self.assertEqual(decodeState(encodeState(["\ud800"])), ["\ud800"])

    def test_sharedIsNotCycle(self) -> None:
        """
        One container found twice, but not inside itself, is plain data;
        it comes back as two equal containers.
        """
        shared = [1, 2]
        value = {"a": shared, "b": [shared, shared]}
        self.assertEqual(decodeState(encodeState(value)), value)

    def test_boundaryIntegers(self) -> None:
        """
        Integers up to 4096 bits are accepted both ways.
        """
        for number in [2**4096 - 1, -(2**4096) + 1, 0, -1]:
            self.assertEqual(decodeState(encodeState(number)), number)


class EncodeRefusalTests(SynchronousTestCase):
    """
    L{encodeState} refuses what is not plain data, saying where it is.
    """

    def assertRefused(self, value: object, *fragments: str) -> StateError:
        """
        Assert that encoding C{value} raises L{StateError} whose message
        contains every one of C{fragments}.
        """
        error: StateError = self.assertRaises(StateError, encodeState, value)
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        return error

    def test_stateErrorIsValueError(self) -> None:
        """
        L{StateError} is a L{ValueError}.
        """
        self.assertTrue(issubclass(StateError, ValueError))

    def test_pathInMessage(self) -> None:
        """
        The message names the path to the offending part.
        """
        error = self.assertRefused({"users": ["a", "b", "c", {4}]})
        self.assertEqual(str(error), "state['users'][3]: set is not plain data")

    def test_topLevel(self) -> None:
        """
        An offending value at the top is called C{state}.
        """
        error = self.assertRefused(b"x")
        self.assertEqual(str(error), "state: bytes is not plain data")

    def test_nonPlainTypes(self) -> None:
        """
        Every type outside plain data is refused, wherever it is, and the
        message names its type and its path.
        """
        values = [
            b"bytes",
            bytearray(b"x"),
            memoryview(b"x"),
            {1, 2},
            frozenset(),
            object(),
            1j,
            Decimal("1.5"),
            Fraction(1, 3),
            range(3),
            len,
            RoundTripTests,
            iter([]),
            collections.OrderedDict(),
            collections.defaultdict(list),
            collections.deque(),
            _Color.red,
            _Point(1, 2),
            _Text("subclass"),
        ]
        for value in values:
            name = type(value).__qualname__
            self.assertRefused(
                {"a": [0, {"b": value}]},
                "state['a'][1]['b']: ",
                f"{name} is not plain data",
            )

    def test_nonFiniteFloats(self) -> None:
        """
        NaN and infinities are refused.
        """
        for value in [float("nan"), float("inf"), float("-inf")]:
            self.assertRefused([1.0, value], "state[1]: float", "not finite")

    def test_nonStrKeys(self) -> None:
        """
        Keys must be C{str}.
        """
        keys: list[object] = [1, None, True, 1.5, (1, 2), b"k", frozenset()]
        for key in keys:
            self.assertRefused(
                {"outer": {key: 1}},
                "state['outer']: key of type",
                type(key).__qualname__,
            )

    def test_hugeInteger(self) -> None:
        """
        Integers over 4096 bits are refused.
        """
        self.assertRefused({"n": 2**4096}, "state['n']: int of 4097 bits")

    def test_cycles(self) -> None:
        """
        A container inside itself is refused, at the place the cycle closes.
        """
        loop: list[Any] = [1]
        loop.append(loop)
        self.assertRefused({"x": loop}, "state['x'][1]: list contains itself")
        mapping: dict[str, Any] = {}
        mapping["self"] = [mapping]
        self.assertRefused(mapping, "state['self'][0]: dict contains itself")

    def test_firstOffenderReported(self) -> None:
        """
        With several offending parts, the first in order is reported.
        """
        self.assertRefused([1, {2}, b"x"], "state[1]: set")
        self.assertRefused({"a": 1, "b": b"", "c": {3}}, "state['b']: bytes")

    def test_longKeyShortened(self) -> None:
        """
        A long key is shortened in the message.
        """
        error = self.assertRefused({"k" * 10000: {1}})
        self.assertLess(len(str(error)), 200)

    def test_neverPickles(self) -> None:
        """
        Objects that know how to pickle themselves are still refused.
        """

        class Picklable:
            def __reduce__(self) -> Any:
                raise AssertionError("pickled")

        self.assertRefused([Picklable()], "Picklable is not plain data")


class BoundsTests(SynchronousTestCase):
    """
    Size and depth are bounded in both directions.
    """

    def test_defaults(self) -> None:
        """
        The default limits are 1 MiB and 32 levels.
        """
        self.assertEqual((MAX_STATE_BYTES, MAX_DEPTH), (1 << 20, 32))

    def test_encodeSizeExactlyAtLimit(self) -> None:
        """
        An encoding exactly C{maxBytes} long is accepted; one byte more is
        refused.
        """
        value = "x" * 98  # encodes to 100 bytes
        self.assertEqual(len(encodeState(value, maxBytes=100)), 100)
        error = self.assertRaises(StateError, encodeState, value + "x", maxBytes=100)
        self.assertIn("limit of 100 bytes", str(error))

    def test_encodeSizeRefusedEarly(self) -> None:
        """
        A value certainly too large is refused before it is encoded.
        """
        encoded = []

        def dumps(*args: object, **kwargs: object) -> str:
            encoded.append(args)
            return ""

        self.patch(_codec.json, "dumps", dumps)
        self.assertRaises(StateError, encodeState, ["x" * 200], maxBytes=100)
        self.assertRaises(StateError, encodeState, {"k" * 200: 1}, maxBytes=100)
        self.assertRaises(StateError, encodeState, [None] * 200, maxBytes=100)
        self.assertEqual(encoded, [])

    def test_encodeSizeDefault(self) -> None:
        """
        By default more than 1 MiB is refused.
        """
        self.assertRaises(StateError, encodeState, "x" * MAX_STATE_BYTES)
        self.assertEqual(len(encodeState("x" * (MAX_STATE_BYTES - 2))), MAX_STATE_BYTES)

    def test_encodeDepth(self) -> None:
        """
        Containers nested C{maxDepth} deep are accepted, deeper refused.
        """
        self.assertEqual(_depth(_nested(MAX_DEPTH)), MAX_DEPTH)
        encodeState(_nested(MAX_DEPTH))
        encodeState({"a": _nested(MAX_DEPTH - 1)})
        error = self.assertRaises(StateError, encodeState, _nested(MAX_DEPTH + 1))
        self.assertIn("nested deeper than the limit of 32 levels", str(error))
        self.assertRaises(StateError, encodeState, {"a": _nested(MAX_DEPTH)})
        encodeState(_nested(5), maxDepth=5)
        self.assertRaises(StateError, encodeState, _nested(6), maxDepth=5)
        encodeState(1, maxDepth=0)
        self.assertRaises(StateError, encodeState, [], maxDepth=0)

    def test_encodeVeryDeep(self) -> None:
        """
        Nesting far deeper than Python's recursion limit is refused with
        L{StateError}, not L{RecursionError}, even with a huge limit.
        """
        deep = _nested(200_000)
        self.assertRaises(StateError, encodeState, deep)
        self.assertRaises(StateError, encodeState, deep, maxDepth=10**9)

    def test_decodeSizeCheckedFirst(self) -> None:
        """
        Input over C{maxBytes} is refused before it is decoded or parsed.
        """
        self.patch(_codec.json, "loads", lambda *a, **k: self.fail("parsed"))
        error = self.assertRaises(StateError, decodeState, b"\xff" * 101, maxBytes=100)
        self.assertIn("larger than the limit of 100 bytes", str(error))
        self.assertRaises(StateError, decodeState, b"1" * (MAX_STATE_BYTES + 1))

    def test_decodeSizeExactlyAtLimit(self) -> None:
        """
        An encoding exactly C{maxBytes} long is decoded.
        """
        self.assertEqual(decodeState(b'"' + b"x" * 98 + b'"', maxBytes=100), "x" * 98)

    def test_decodeDepth(self) -> None:
        """
        JSON nested C{maxDepth} deep is decoded, deeper is refused.
        """
        self.assertEqual(
            decodeState(encodeState(_nested(MAX_DEPTH))), _nested(MAX_DEPTH)
        )
        deeper = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
        error = self.assertRaises(StateError, decodeState, deeper)
        self.assertIn("nested deeper than the limit of 32 levels", str(error))
        mixed = b'{"a":' * 3 + b"[" * 3 + b"1" + b"]" * 3 + b"}" * 3
        self.assertEqual(_depth(decodeState(mixed, maxDepth=6)), 6)
        self.assertRaises(StateError, decodeState, mixed, maxDepth=5)

    def test_decodeSiblingsDoNotAddUp(self) -> None:
        """
        Depth is nesting, not the number of containers.
        """
        value = [[[1]] * 1000, {"a": []}, [[]]]
        self.assertEqual(_depth(value), 3)
        self.assertEqual(decodeState(encodeState(value), maxDepth=3), value)

    def test_decodeVeryDeep(self) -> None:
        """
        Deeply nested JSON is refused before parsing, with L{StateError}
        and not L{RecursionError}.
        """
        self.patch(_codec.json, "loads", lambda *a, **k: self.fail("parsed"))
        for data in [
            b"[" * 500_000 + b"]" * 500_000,
            b'{"a":' * 150_000 + b"1" + b"}" * 150_000,
            b"[" * 1_000_000,
            b"]" * 1_000_000 + b"[" * 10,
        ]:
            self.assertRaises(StateError, decodeState, data, maxBytes=1 << 21)

    def test_bracketsInStringsAreText(self) -> None:
        """
        Brackets inside strings, escaped quotes included, are not nesting.
        """
        text = '[[{{"\\"' * 50
        data = json.dumps([text, {"k]]": "}}"}]).encode("ascii")
        self.assertEqual(decodeState(data, maxDepth=2), [text, {"k]]": "}}"}])

    def test_unterminatedString(self) -> None:
        """
        An unterminated string, however long, is refused in linear time.
        """
        for data in [b'"' + b'\\"' * 400_000, b'["' + b"\\" * 900_000]:
            self.assertRaises(StateError, decodeState, data)


class DecodeRefusalTests(SynchronousTestCase):
    """
    L{decodeState} refuses whatever is not the encoding of plain data, always
    with L{StateError}.
    """

    def test_garbage(self) -> None:
        """
        Invalid UTF-8, non-JSON and JSON extensions are refused.
        """
        for data in [
            b"",
            b" ",
            b"\xff\xfe",
            b'"\xc3"',
            b"\xef\xbb\xbf1",
            b"{",
            b"[1,]",
            b"{'a': 1}",
            b"1 2",
            b"NaN",
            b"[Infinity]",
            b"-Infinity",
            b"1e999",
            b"[-1e400]",
            b'{"a":1,"a":2}',
            b"9" * 1300,
            b"-" + b"9" * 1300,
            str(2**4096).encode("ascii"),
            b'"\x00"',
            b"undefined",
        ]:
            self.assertRaises(StateError, decodeState, data)

    def test_notBytes(self) -> None:
        """
        Only C{bytes} are decoded.
        """
        for data in ["[]", None, 1, bytearray(b"[]"), ["[]"]]:
            error = self.assertRaises(StateError, decodeState, data)
            self.assertIn("must be bytes", str(error))

    def test_neverUnpickles(self) -> None:
        """
        A pickle is garbage, not state.
        """
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            data = pickle.dumps({"a": [1, 2]}, protocol=protocol)
            self.assertRaises(StateError, decodeState, data)

    def test_duplicateKeyNamed(self) -> None:
        """
        A duplicate key is named.
        """
        error = self.assertRaises(StateError, decodeState, b'[{"k":1,"j":2,"k":3}]')
        self.assertIn("duplicate key 'k'", str(error))

    @_EXAMPLES
    @given(st.binary(max_size=200))
    def test_randomBytes(self, data: bytes) -> None:
        """
        Random bytes are decoded into plain data, or refused with
        L{StateError}; never anything else.
        """
        try:
            value = decodeState(data)
        except StateError:
            return
        self.assertEqual(decodeState(encodeState(value)), value)

    @_EXAMPLES
    @given(st.text(alphabet='[]{}",:\\0123456789.eE-+ nultrfasx', max_size=200))
    def test_randomJSONishText(self, text: str) -> None:
        """
        Random text made of JSON's punctuation is decoded into plain data,
        or refused with L{StateError}; never anything else.
        """
        try:
            value = decodeState(text.encode("ascii"), maxDepth=4)
        except StateError:
            return
        self.assertLessEqual(_depth(value), 4)

    @_EXAMPLES
    @given(plainData, st.data())
    def test_corruptedEncoding(self, value: Any, data: st.DataObject) -> None:
        """
        A valid encoding with one byte changed is decoded or refused with
        L{StateError}.
        """
        encoded = bytearray(encodeState(value, maxBytes=1 << 24, maxDepth=1000))
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
        try:
            decodeState(bytes(encoded), maxBytes=1 << 24, maxDepth=1000)
        except StateError:
            pass
