"""Unpickling data files that hold plain numpy arrays, without running anything they ask for.

A pickle is a program: ``GLOBAL os system`` plus ``REDUCE`` runs a shell
command, and even numpy's own reconstructors allocate whatever the pickle
says (``_reconstruct(ndarray, (300000, 3072), 'B')`` is 921 MB from a few
bytes). `RestrictedUnpickler` therefore never hands the pickle a real numpy
callable. ``find_class`` answers only the names numpy and Python write when
pickling plain arrays and scalars, and answers each with a stand-in of ours
that checks its arguments and builds the value from bytes the pickle itself
holds, so memory is bounded by the pickle's size:

==========================================  =====================================================
pickle asks for                             written by
==========================================  =====================================================
``numpy[._]core.multiarray._reconstruct``   ndarray, protocols 0-4 (then ``BUILD`` with the bytes)
``numpy.ndarray``                           the argument of ``_reconstruct``, never called
``numpy.dtype``                             dtypes (only plain bool/int/uint/float, copied)
``numpy[._]core.multiarray.scalar``         numpy scalars (``np.int64`` labels)
``numpy[._]core.numeric._frombuffer``       ndarray, protocol 5
``_codecs.encode``, ``__builtin__.bytes``   Python 3 ``bytes`` at protocol 2 (latin-1 text)
==========================================  =====================================================

Before unpickling, the opcodes are scanned (`pickletools.genops`, which reads
nothing it is not given): CPython's unpickler sizes its memo table by the
largest index a ``PUT`` names and allocates a ``BINBYTES8`` buffer by its
declared length, so a dozen bytes could otherwise ask for gigabytes.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
from typing import Any

import numpy as np

from localssl.data.base import DatasetError


class UnsafePickleError(DatasetError):
    """A pickle asked for a global outside the allow-list, or used one in a way plain arrays never do."""


class _Refused(Exception):
    """Raised by the stand-ins; `restricted_loads` turns it into an `UnsafePickleError` naming the file."""


def _text(obj: Any) -> str:
    # Python 2 pickles read with encoding="bytes" give b'u1' where Python 3 ones give 'u1'.
    if isinstance(obj, bytes):
        return obj.decode("ascii", "replace")
    if isinstance(obj, str):
        return obj
    raise _Refused(f"expected a string, got {type(obj).__name__}")


class _NdarrayToken:
    """What ``numpy.ndarray`` resolves to: a name `_reconstruct` accepts, not a callable class."""

    def __repr__(self) -> str:
        return "numpy.ndarray"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("numpy.ndarray called directly (it allocates whatever shape it is given)")


_NDARRAY = _NdarrayToken()

_DTYPE_SPEC = re.compile(r"[<>|=]?[biuf?][1248]?|[<>|=]?[bBhHiIlLqQefdg?]")


class _Dtype:
    """A plain numeric numpy dtype as rebuilt from a pickle (``numpy.dtype`` call, then ``BUILD``)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata]).
        # Plain number types have no subarray, names or fields; anything else is not a plain array.
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and state[2:5] == (None, None, None)):  # fmt: skip
            raise _Refused(f"dtype state {state!r:.80} is not that of a plain number type")
        order = _text(state[1])
        if order not in ("<", ">", "|", "="):
            raise _Refused(f"dtype byte order {order!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> _Dtype:
    """``numpy.dtype(spec, align, copy)``: only short codes of bool/int/uint/float types, always a copy."""
    code = _text(spec)
    if not _DTYPE_SPEC.fullmatch(code):
        raise _Refused(f"dtype {code!r:.40} is not a plain number type")
    return _Dtype(np.dtype(code))


def _checked_dtype(obj: Any) -> np.dtype:
    if not isinstance(obj, _Dtype):
        raise _Refused(f"expected a dtype, got {type(obj).__name__}")
    return obj.dtype


def _from_bytes(raw: Any, dtype: np.dtype, shape: Any, fortran: bool) -> np.ndarray:
    """An array over bytes the pickle holds: its size must be exactly what shape and dtype say."""
    if not isinstance(raw, (bytes, bytearray)):
        raise _Refused(f"array data must be bytes, got {type(raw).__name__}")
    if not (isinstance(shape, tuple) and all(type(s) is int and 0 <= s < 2**40 for s in shape)):
        raise _Refused(f"array shape {shape!r:.60} is not a tuple of sizes")
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise _Refused(f"array of shape {shape} and dtype {dtype} needs {math.prod(shape) * dtype.itemsize} bytes, "
                       f"the pickle holds {len(raw)}")  # fmt: skip
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")


class _Array:
    """An array being rebuilt: `_reconstruct` makes it empty, ``BUILD`` gives it shape, dtype and bytes."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # ndarray state: (version, shape, dtype, is_fortran, rawdata), or the same without version.
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise _Refused("array state is not (shape, dtype, fortran, data)")
        shape, dtype, fortran, raw = state
        self.array = _from_bytes(raw, _checked_dtype(dtype), shape, bool(fortran))


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> _Array:
    """``numpy.core.multiarray._reconstruct``: numpy always writes an empty ``(0,)`` array here."""
    if subtype is not _NDARRAY:
        raise _Refused(f"_reconstruct of {subtype!r:.40}, not numpy.ndarray")
    if not (isinstance(shape, tuple) and all(type(s) is int for s in shape) and math.prod(shape) == 0):
        raise _Refused(f"_reconstruct with shape {shape!r:.60}; numpy pickles an empty array, then its data")
    _text(dtype)
    return _Array()


def _scalar(dtype: Any, raw: Any) -> Any:
    """``numpy.core.multiarray.scalar``: one number from exactly ``itemsize`` bytes."""
    dt = _checked_dtype(dtype)
    if not isinstance(raw, bytes) or len(raw) != dt.itemsize:
        raise _Refused(f"numpy scalar of dtype {dt} from {type(raw).__name__} of the wrong size")
    return np.frombuffer(raw, dtype=dt)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """``numpy.core.numeric._frombuffer`` (protocol 5 arrays, their bytes in the pickle)."""
    if _text(order) not in ("C", "F"):
        raise _Refused(f"array order {order!r:.20}")
    return _from_bytes(buf, _checked_dtype(dtype), shape, _text(order) == "F")


def _codecs_encode(obj: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: how Python 3 writes ``bytes`` at protocol 2 (latin-1 text, encoded back)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode other than (str, 'latin1')")
    return obj.encode("latin1")


def _bytes(*args: Any) -> bytes:
    """``bytes()``: how Python 3 writes an empty ``bytes`` at protocol 2."""
    if args:
        raise _Refused("bytes() with arguments")
    return b""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and plain numpy arrays/scalars, and nothing that runs code.

    ``find_class`` is the only door through which a pickle reaches callables
    (``os.system`` in a ``__reduce__``, say); it opens onto the stand-ins in
    `ALLOWED` only (see the module docstring) and refuses everything else,
    naming the file and the global, before anything can be called.
    """

    ALLOWED: dict[tuple[str, str], Any] = {
        **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(m, "scalar"): _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _dtype,
        ("_codecs", "encode"): _codecs_encode,
        ("__builtin__", "bytes"): _bytes,
        ("builtins", "bytes"): _bytes,
    }

    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        # encoding="bytes": Python 2 str -> bytes, hence the b'data' keys, and
        # numpy's raw array buffer stays bytes.
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.where}: refusing to unpickle global {module}.{name}; only plain numpy arrays and "
                "scalars, dicts, lists, numbers and strings are allowed"
            ) from None


def _scan(data: bytes, where: str) -> None:
    """Refuse opcodes whose arguments would make the C unpickler allocate more than the pickle holds."""
    for count, (op, arg, _pos) in enumerate(pickletools.genops(data)):  # raises on lengths past the end
        # A pickler numbers memo slots 0, 1, 2, ... one PUT each, so an index is never above the opcode count.
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > count:
            raise UnsafePickleError(f"{where}: pickle memo index {arg} at opcode {count}; refusing it")


def _unwrap(obj: Any, depth: int = 0) -> Any:
    """Replace rebuilt arrays by their numpy array, in the top-level dict/list and one level down."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise _Refused("an array without data")
        return obj.array
    if isinstance(obj, _Dtype):
        return obj.dtype
    if depth >= 2:
        return obj
    if isinstance(obj, dict):
        return {k: _unwrap(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unwrap(v, depth + 1) for v in obj]
    return obj


def restricted_loads(data: bytes, where: str) -> Any:
    """Unpickle ``data`` with `RestrictedUnpickler`; any failure is a `DatasetError` naming ``where``."""
    try:
        _scan(data, where)
        return _unwrap(RestrictedUnpickler(io.BytesIO(data), where).load())
    except DatasetError:
        raise
    except _Refused as e:
        raise UnsafePickleError(f"{where}: {e}; refusing the pickle") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... on damaged files
        raise DatasetError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from e
