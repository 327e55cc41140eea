"""A protobuf wire-format scanner for ONNX files: cheap checks without a full parse.

Parsing a 435 MB ModelProto with ``onnx.load`` takes ~1.4 s here (the weights
are copied into Python objects); compiling it takes about as long. This walks
the file's wire format over a memory map instead, stepping over weight bytes
by their length, to answer what aioov needs before compiling: is this an ONNX
model at all, is it truncated, and which external-data files does it use.
It reads only field numbers from onnx.proto; everything else is skipped.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ("ScanError", "ModelScan", "scan_bytes", "scan_file")

# Field numbers from onnx/onnx.proto
_MODEL_IR_VERSION, _MODEL_OPSET, _MODEL_GRAPH, _MODEL_FUNCTIONS = 1, 8, 7, 25
_FUNCTION_NODE, _FUNCTION_ATTRIBUTE_PROTO = 7, 11
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VALUE_INFO_NAME = 1
_DATA_LOCATION_EXTERNAL = 1
_MAX_DEPTH = 64


class ScanError(ValueError):
    """The bytes are not a well-formed ONNX ModelProto."""


@dataclass
class ExternalRef:
    tensor: str
    location: str
    offset: int = 0
    length: int | None = None
    #: (offset, length) of the weights onnxruntime saved prepacked beside this tensor
    prepacked: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ModelScan:
    ir_version: int = 0
    opset_count: int = 0
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    initializers: list[str] = field(default_factory=list)  # the main graph's (dense) ones
    external: list[ExternalRef] = field(default_factory=list)

    @property
    def external_locations(self) -> list[str]:
        """Each external-data file once, in order of first use."""
        return list(dict.fromkeys(ref.location for ref in self.external))


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ScanError("truncated: the file ends inside a field")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ScanError("malformed varint")


def _fields(buf: memoryview, pos: int, end: int):  # type: ignore[no-untyped-def]
    """Yield (field number, wire type, value or (start, stop)) for one message."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ScanError("field number 0 is not valid protobuf")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ScanError("truncated: a field is longer than the data left")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise ScanError("truncated: the file ends inside a field")
            yield number, wire, None
        else:
            raise ScanError(f"unsupported wire type {wire}: not an ONNX protobuf")


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0] : span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise ScanError("a string field is not UTF-8: not an ONNX protobuf") from None


class _Scanner:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.result = ModelScan()

    def model(self) -> ModelScan:
        saw_graph = False
        for number, wire, value in _fields(self.buf, 0, len(self.buf)):
            if number == _MODEL_IR_VERSION and wire == 0:
                self.result.ir_version = value
            elif number == _MODEL_OPSET and wire == 2:
                self.result.opset_count += 1
            elif number == _MODEL_GRAPH and wire == 2:
                saw_graph = True
                self.graph(value, depth=0, top=True)
            elif number == _MODEL_FUNCTIONS and wire == 2:
                self.function(value)
        if not saw_graph or self.result.ir_version <= 0:
            raise ScanError("no graph or ir_version: not an ONNX model")
        return self.result

    def graph(self, span: tuple[int, int], depth: int, top: bool = False) -> None:
        if depth > _MAX_DEPTH:
            raise ScanError("subgraphs nested too deeply")
        for number, wire, value in _fields(self.buf, *span):
            if wire != 2:
                continue
            if number == _GRAPH_INITIALIZER:
                name = self.tensor(value)
                if top:
                    self.result.initializers.append(name)
            elif number == _GRAPH_SPARSE_INITIALIZER:
                self.sparse(value)
            elif number == _GRAPH_NODE:
                self.node(value, depth)
            elif top and number in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                names = self.result.inputs if number == _GRAPH_INPUT else self.result.outputs
                for n, w, v in _fields(self.buf, *value):
                    if n == _VALUE_INFO_NAME and w == 2:
                        names.append(_text(self.buf, v))

    def function(self, span: tuple[int, int]) -> None:
        """A model-local function: its nodes, and its attributes' defaults, may hold tensors
        stored externally just like the main graph's."""
        for number, wire, value in _fields(self.buf, *span):
            if wire != 2:
                continue
            if number == _FUNCTION_NODE:
                self.node(value, 0)
            elif number == _FUNCTION_ATTRIBUTE_PROTO:
                self.attribute(value, 0)

    def node(self, span: tuple[int, int], depth: int) -> None:
        for number, wire, value in _fields(self.buf, *span):
            if number == _NODE_ATTRIBUTE and wire == 2:
                self.attribute(value, depth)

    def attribute(self, span: tuple[int, int], depth: int) -> None:
        for number, wire, value in _fields(self.buf, *span):
            if wire != 2:
                continue
            if number in (_ATTR_T, _ATTR_TENSORS):
                self.tensor(value)
            elif number in (_ATTR_G, _ATTR_GRAPHS):
                self.graph(value, depth + 1)
            elif number in (_ATTR_SPARSE, _ATTR_SPARSES):
                self.sparse(value)

    def sparse(self, span: tuple[int, int]) -> None:
        for number, wire, value in _fields(self.buf, *span):
            if wire == 2 and number in (_SPARSE_VALUES, _SPARSE_INDICES):
                self.tensor(value)

    def tensor(self, span: tuple[int, int]) -> str:
        """Record the tensor's external data, if any; its name."""
        name, external, entries = "", False, {}
        for number, wire, value in _fields(self.buf, *span):
            if number == _TENSOR_NAME and wire == 2:
                name = _text(self.buf, value)
            elif number == _TENSOR_DATA_LOCATION and wire == 0:
                external = value == _DATA_LOCATION_EXTERNAL
            elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
                key = val = ""
                for n, w, v in _fields(self.buf, *value):
                    if n == _ENTRY_KEY and w == 2:
                        key = _text(self.buf, v)
                    elif n == _ENTRY_VALUE and w == 2:
                        val = _text(self.buf, v)
                entries[key] = val
        if not external:
            return name
        if not entries.get("location"):
            raise ScanError(f"tensor {name!r} is stored externally but names no location")
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise ScanError(f"tensor {name!r} has a non-numeric external offset/length") from None
        self.result.external.append(ExternalRef(name, entries["location"], offset, length, _prepacked(entries)))
        return name


def _prepacked(entries: dict[str, str]) -> list[tuple[int, int]]:
    """onnxruntime's prepacked buffers of a tensor: entries ``prepacked...`` = ``kernel|offset;length;...``."""
    found = []
    for key, value in entries.items():
        if key.startswith("prepacked"):
            try:
                offset, length = value.split("|", 1)[1].split(";")[:2]
                found.append((int(offset), int(length)))
            except (IndexError, ValueError):
                raise ScanError(f"unreadable prepacked weights entry {value[:80]!r}") from None
    return found


def scan_bytes(data: bytes | bytearray | memoryview | mmap.mmap) -> ModelScan:
    """Scan an in-memory ONNX model."""
    if len(data) == 0:
        raise ScanError("empty: not an ONNX model")
    with memoryview(data) as buf:
        return _Scanner(buf).model()


def scan_file(path: str | Path) -> ModelScan:
    """Scan an ONNX file through a read-only memory map (no copy of the weights)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ScanError("empty file: not an ONNX model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                return _Scanner(buf).model()
            finally:
                buf.release()
