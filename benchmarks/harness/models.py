"""Benchmark models: what is trained, and its size."""

from __future__ import annotations

import numpy as np

# The benchmark models are deliberately plain MLPs: their parameter count is
# easy to state and to reproduce in the planner, and by choosing widths and
# batch size one model is dominated by the optimizer update (many parameters,
# tiny batch) and the other by the forward/backward matmuls (few parameters,
# large batch).

MODELS = {
    # ~3.2M float32 parameters, 2 examples per replica: the per-step cost is the
    # Adam math and the gradient/parameter traffic, not the matmuls.
    "update_bound": {"input_dim": 256, "widths": [1024, 1024, 1024, 256], "batch_per_replica": 2},
    # ~0.2M parameters, 1024 examples per replica: the matmuls dominate.
    "compute_bound": {"input_dim": 256, "widths": [256, 256, 256, 64], "batch_per_replica": 1024},
    # Uneven sizes (not divisible by 3 or 8) so padding shows up in the
    # memory measurement; small so eight replicas build in seconds.
    "memory": {"input_dim": 37, "widths": [129, 61, 10], "batch_per_replica": 4},
}


def _embedding_model(vocab=200_000, dim=32, ids=16):
    def make():
        import keras

        keras.utils.set_random_seed(0)
        tokens = keras.Input((ids,), dtype="int32")
        x = keras.layers.Embedding(vocab, dim, name="table")(tokens)
        x = keras.layers.GlobalAveragePooling1D()(x)
        x = keras.layers.Dense(64, activation="relu")(x)
        return keras.Model(tokens, keras.layers.Dense(8)(x))
    return make


def _transformer_model(length=64, d=128, heads=4, hidden=512):
    def make():
        import keras

        keras.utils.set_random_seed(0)
        inputs = keras.Input((length, d))
        x = keras.layers.LayerNormalization()(inputs)
        x = keras.layers.MultiHeadAttention(heads, d // heads)(x, x)
        x = keras.layers.Add()([inputs, x])
        y = keras.layers.LayerNormalization()(x)
        y = keras.layers.Dense(hidden, activation="gelu")(y)
        y = keras.layers.Dense(d)(y)
        return keras.Model(inputs, keras.layers.Add()([x, y]))
    return make


# The multi-process benchmark's models (per-worker batch): what decides speed
# when every worker has its own device.
MULTIPROCESS_MODELS = {
    # MLP 64-1024-1024-1024-256, 2.4M params, 2 examples: the update and the
    # gradient/parameter traffic dominate.
    "dense_update_bound": {"make": lambda: mlp(64, [1024, 1024, 1024, 256]), "batch": 2,
                           "x": ("float", (64,)), "y": (256,)},
    # MLP 64-512-256-256-16, 0.23M params, 256 examples: the matmuls dominate.
    "dense_compute_bound": {"make": lambda: mlp(64, [512, 256, 256, 16]), "batch": 256,
                            "x": ("float", (64,)), "y": (16,)},
    # Embedding(200k, 32) -> mean of 16 ids -> Dense 64 -> 8: a table whose
    # gradient is a few rows (tf.IndexedSlices).
    "embedding": {"make": _embedding_model(), "batch": 32, "x": ("ids", (16,), 200_000), "y": (8,)},
    # One pre-norm Transformer block (4-head attention + MLP, LayerNorms),
    # d=128, length 64.
    "transformer": {"make": _transformer_model(), "batch": 8, "x": ("float", (64, 128)), "y": (64, 128)},
}


def mlp(input_dim, widths, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((input_dim,))]
    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        layers.append(keras.layers.Dense(width, activation=None if last else "relu", name=f"dense{i}"))
    return keras.Sequential(layers)


def many_variables_model(num_variables, seed=0):
    """A model with exactly ``num_variables`` small trainable variables (pairs
    of kernel+bias in parallel Dense heads, plus one bias-free head when odd),
    for counting collectives as the variable count grows."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    heads = [keras.layers.Dense(2, name=f"head{i}")(inputs) for i in range(num_variables // 2)]
    if num_variables % 2:
        heads.append(keras.layers.Dense(2, use_bias=False, name="odd_head")(inputs))
    out = heads[0] if len(heads) == 1 else keras.layers.Add()(heads)
    model = keras.Model(inputs, out)
    assert len(model.trainable_variables) == num_variables, len(model.trainable_variables)
    return model


def model_summary(model) -> dict:
    by_dtype = {}
    for v in model.trainable_variables:
        dtype = str(v.dtype)
        by_dtype[dtype] = by_dtype.get(dtype, 0) + int(np.prod(v.shape))
    return {
        "num_variables": len(model.trainable_variables),
        "params": sum(by_dtype.values()),
        "params_by_dtype": by_dtype,
        "param_bytes": sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.trainable_variables),
        "variable_shapes": [list(map(int, v.shape)) for v in model.trainable_variables],
    }
