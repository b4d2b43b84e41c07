"""A small ONNX graph builder: nodes get fresh output names; weights go straight to the external
data file as they are added (protobuf cannot hold more than 2 GB, and nothing is kept in memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INLINE_BYTES = 1024  # smaller tensors (shapes, axes, scalars) stay in the graph: shape inference reads them
ALIGN = 4096  # external tensors start page-aligned, so onnxruntime can map them

MS_DOMAIN = "com.microsoft"
OPSET = 17


class Graph:
    def __init__(self, data_path: Path | None = None):
        """data_path: the external data file to write large weights into (None: all inline)."""
        self.data_path = Path(data_path) if data_path else None
        self._data = open(self.data_path, "wb") if data_path else None
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, name: str | None = None, outputs: int = 1, domain: str = "",
           **attrs):
        """Add a node; returns its output name (or names when outputs > 1)."""
        outs = [name] if name and outputs == 1 else [self.fresh(f"{op_type.lower()}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), domain=domain,
                                           **attrs))
        return outs[0] if outputs == 1 else outs

    def weight(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if self._data is None or array.nbytes < INLINE_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        return self.weight_rows(name, array.shape, array.dtype, [array])

    def weight_rows(self, name: str, shape: tuple, dtype, parts: Iterable[np.ndarray]) -> str:
        """A large weight written part by part (consecutive row blocks) into the external data file."""
        pad = -self._data.tell() % ALIGN
        self._data.write(b"\0" * pad)
        offset = self._data.tell()
        for part in parts:
            self._data.write(np.ascontiguousarray(part, dtype=dtype).tobytes())
        length = self._data.tell() - offset
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if length != expected:
            raise ValueError(f"{name}: wrote {length} bytes for shape {shape}, expected {expected}")
        tensor = TensorProto(name=name, dims=list(shape), data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def close_data(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def const(self, values, dtype=np.int64) -> str:
        """A small constant initializer, shared between uses."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), array)
        return self._consts[key]

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        """Expose `value` as graph output `name` (through Identity when the names differ)."""
        if value != name:
            self.op("Identity", value, name=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgephi")
        model.ir_version = 8  # readable by onnxruntime releases from 1.14 on
        return model


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
