"""A small ONNX graph builder: nodes get fresh output names, initializers are plain numpy arrays."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
OPSET = 17


class Graph:
    def __init__(self):
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
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

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
