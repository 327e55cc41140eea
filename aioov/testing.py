"""Synthetic ONNX models for tests, benchmarks and examples.

Built with ``onnx.helper`` so that no framework (torch, tensorflow) and no
download is needed. The transformer model follows BERT-base's shape
(``bert_like()`` with its defaults is ~435 MB of float32 weights), which is
what makes ONNX Runtime's session creation slow enough to be worth caching.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ("bert_like", "mlp", "save_with_external_data")

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def mlp(
    in_features: int = 8,
    hidden: int = 16,
    out_features: int = 4,
    *,
    seed: int = 0,
) -> onnx.ModelProto:
    """A two-layer perceptron: ``x[N, in] -> Relu(x @ W1 + b1) @ W2 + b2``."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("W1", rng.standard_normal((in_features, hidden), dtype=np.float32)),
        _init("b1", rng.standard_normal(hidden, dtype=np.float32)),
        _init("W2", rng.standard_normal((hidden, out_features), dtype=np.float32)),
        _init("b2", rng.standard_normal(out_features, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_features])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def bert_like(
    layers: int = 12,
    hidden: int = 768,
    heads: int = 12,
    intermediate: int | None = None,
    vocab: int = 30522,
    *,
    seed: int = 0,
) -> onnx.ModelProto:
    """A BERT-style encoder: embedding lookup then ``layers`` attention + FFN blocks.

    Input ``input_ids`` is int64 ``[batch, sequence]``; output ``last_hidden_state``
    is float32 ``[batch, sequence, hidden]``. Written in the op patterns that
    ONNX Runtime's transformer optimizer fuses (LayerNormalization, erf-Gelu,
    MatMul+Add), so that graph optimization does real work.
    """
    intermediate = intermediate or 4 * hidden
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)
    scale = 0.02

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    inits: list[onnx.TensorProto] = [
        _init("embeddings", weight(vocab, hidden)),
        _init("emb_ln_g", np.ones(hidden, np.float32)),
        _init("emb_ln_b", np.zeros(hidden, np.float32)),
        _init("split_shape", np.array([0, 0, heads, head_dim], np.int64)),
        _init("merge_shape", np.array([0, 0, hidden], np.int64)),
        _init("attn_scale", np.array(1.0 / math.sqrt(head_dim), np.float32)),
        _init("sqrt2", np.array(math.sqrt(2.0), np.float32)),
        _init("one", np.array(1.0, np.float32)),
        _init("half", np.array(0.5, np.float32)),
    ]
    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["emb"]),
        helper.make_node(
            "LayerNormalization", ["emb", "emb_ln_g", "emb_ln_b"], ["h0"], axis=-1, epsilon=1e-12
        ),
    ]
    x = "h0"
    for i in range(layers):
        p = f"l{i}_"
        for name, shape in (
            ("wq", (hidden, hidden)),
            ("wk", (hidden, hidden)),
            ("wv", (hidden, hidden)),
            ("wo", (hidden, hidden)),
            ("w1", (hidden, intermediate)),
            ("w2", (intermediate, hidden)),
        ):
            inits.append(_init(p + name, weight(*shape)))
        for name, size in (("bq", hidden), ("bk", hidden), ("bv", hidden), ("bo", hidden),
                           ("b1", intermediate), ("b2", hidden)):
            inits.append(_init(p + name, weight(size)))
        for name in ("ln1", "ln2"):
            inits.append(_init(p + name + "_g", np.ones(hidden, np.float32)))
            inits.append(_init(p + name + "_b", np.zeros(hidden, np.float32)))
        for proj in ("q", "k", "v"):
            nodes += [
                helper.make_node("MatMul", [x, p + "w" + proj], [p + proj + "_mm"]),
                helper.make_node("Add", [p + proj + "_mm", p + "b" + proj], [p + proj + "_lin"]),
                helper.make_node("Reshape", [p + proj + "_lin", "split_shape"], [p + proj + "_heads"]),
            ]
        nodes += [
            helper.make_node("Transpose", [p + "q_heads"], [p + "q_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Transpose", [p + "k_heads"], [p + "k_t"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", [p + "v_heads"], [p + "v_t"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [p + "q_t", p + "k_t"], [p + "scores"]),
            helper.make_node("Mul", [p + "scores", "attn_scale"], [p + "scaled"]),
            helper.make_node("Softmax", [p + "scaled"], [p + "probs"], axis=-1),
            helper.make_node("MatMul", [p + "probs", p + "v_t"], [p + "ctx"]),
            helper.make_node("Transpose", [p + "ctx"], [p + "ctx_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [p + "ctx_t", "merge_shape"], [p + "ctx_m"]),
            helper.make_node("MatMul", [p + "ctx_m", p + "wo"], [p + "o_mm"]),
            helper.make_node("Add", [p + "o_mm", p + "bo"], [p + "o"]),
            helper.make_node("Add", [x, p + "o"], [p + "res1"]),
            helper.make_node(
                "LayerNormalization", [p + "res1", p + "ln1_g", p + "ln1_b"], [p + "a"],
                axis=-1, epsilon=1e-12,
            ),
            helper.make_node("MatMul", [p + "a", p + "w1"], [p + "f_mm"]),
            helper.make_node("Add", [p + "f_mm", p + "b1"], [p + "f"]),
            # Gelu written as x * 0.5 * (1 + erf(x / sqrt 2)), which ORT fuses.
            helper.make_node("Div", [p + "f", "sqrt2"], [p + "g_div"]),
            helper.make_node("Erf", [p + "g_div"], [p + "g_erf"]),
            helper.make_node("Add", [p + "g_erf", "one"], [p + "g_add"]),
            helper.make_node("Mul", [p + "f", p + "g_add"], [p + "g_mul"]),
            helper.make_node("Mul", [p + "g_mul", "half"], [p + "gelu"]),
            helper.make_node("MatMul", [p + "gelu", p + "w2"], [p + "f2_mm"]),
            helper.make_node("Add", [p + "f2_mm", p + "b2"], [p + "f2"]),
            helper.make_node("Add", [p + "a", p + "f2"], [p + "res2"]),
            helper.make_node(
                "LayerNormalization", [p + "res2", p + "ln2_g", p + "ln2_b"], [p + "out"],
                axis=-1, epsilon=1e-12,
            ),
        ]
        x = p + "out"
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    graph = helper.make_graph(
        nodes,
        "bert_like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info(
            "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]
        )],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def save_with_external_data(
    model: onnx.ModelProto, path: str | Path, data_name: str | None = None, *, size_threshold: int = 1024
) -> Path:
    """Save ``model`` with its initializers of ``size_threshold`` bytes or more in one
    weights file beside it (small shape tensors stay inline: ORT needs them there).

    The layout models over 2 GB must use, and a common one for large models
    below that size too: ``model.onnx`` plus ``model.onnx.data``.
    """
    path = Path(path)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name or path.name + ".data",
        size_threshold=size_threshold,
    )
    return path
