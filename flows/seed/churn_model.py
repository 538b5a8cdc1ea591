"""Writes churn_prediction.onnx, the churn model of customer_360_profile.yaml.

A logistic model: ``score = sigmoid(WEIGHTS . [purchase_frequency, avg_order_value,
days_since_last_order] + BIAS)``, so a test can compute the score it must give. Needs the
``onnx`` package (in the ``dev`` extra):  python flows/seed/churn_model.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

INPUTS = ("purchase_frequency", "avg_order_value", "days_since_last_order")
WEIGHTS = (-20.0, -0.01, 0.01)
BIAS = -2.0


def churn_score(purchase_frequency: float, avg_order_value: float,
                days_since_last_order: float) -> float:
    """The score the model gives (in float64; the model computes in float32)."""
    z = (WEIGHTS[0] * purchase_frequency + WEIGHTS[1] * avg_order_value
         + WEIGHTS[2] * days_since_last_order + BIAS)
    return 1 / (1 + math.exp(-z))


def write_model(path: Path) -> None:
    """Save the model as ONNX (opset 13) at ``path``."""
    from onnx import TensorProto, helper, save

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 1]) for n in INPUTS]
    nodes = [
        helper.make_node("Concat", list(INPUTS), ["x"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["churn_risk"]),
    ]
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [3, 1], list(WEIGHTS)),
             helper.make_tensor("b", TensorProto.FLOAT, [1], [BIAS])]
    output = helper.make_tensor_value_info("churn_risk", TensorProto.FLOAT, [None, 1])
    graph = helper.make_graph(nodes, "churn_prediction", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(path))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name(
        "churn_prediction.onnx")
    write_model(target)
    print(target)
