"""What the planner plans for: the trainable variables' shapes and dtypes,
from a parameter count (``--params``) or a saved Keras model (``--model``),
read without allocating any weight. TensorFlow is imported only for a model
file (Keras rebuilds the model from its config)."""

from __future__ import annotations

import json
import math
import zipfile

from distadam.planner_math import VariableSpec, itemsize

# Bounds on what the command line can ask for: well past any real model,
# small enough that every number stays exact in a float64.
MAX_PARAMS = 10**15
# A .keras file's config.json is a few kB to a few MB; more is not a model.
MAX_CONFIG_BYTES = 64 << 20


def variables_from_count(params: float, dtype: str) -> list:
    if not isinstance(params, (int, float)) or not math.isfinite(params) or params != int(params) \
            or not 1 <= params <= MAX_PARAMS:
        raise ValueError(f"--params must be a positive whole number up to {MAX_PARAMS:.0e}, got {params!r}")
    count = int(params)
    itemsize(dtype)
    # One variable of Ψ elements: one bucket, the layout ShardedAdam uses for a
    # single-dtype model with the default bucket_elements=None.
    return [VariableSpec("params", (count,), dtype)]


def read_model_config(path: str) -> dict:
    """The model's serialized config, without reading any weights: from a
    ``.keras`` zip's ``config.json``, or an ``.h5`` file's ``model_config``."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo("config.json")
                if info.file_size > MAX_CONFIG_BYTES:
                    raise ValueError(f"config.json is {info.file_size} bytes (at most {MAX_CONFIG_BYTES})")
                with archive.open(info) as member:
                    text = member.read(MAX_CONFIG_BYTES + 1)
                if len(text) > MAX_CONFIG_BYTES:
                    raise ValueError(f"config.json is more than {MAX_CONFIG_BYTES} bytes")
        else:
            import h5py

            with h5py.File(path, "r") as h5:
                text = h5.attrs.get("model_config")
                if text is None:
                    raise ValueError("neither a .keras zip nor an .h5 file with a model_config")
        config = json.loads(text)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot load a Keras model from {path!r}: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"cannot load a Keras model from {path!r}: its config is not an object")
    return config


def variables_from_model(path: str) -> list:
    """Trainable variables of a saved Keras model (``.keras`` or ``.h5``),
    shapes only: the model is rebuilt from its config inside
    ``keras.StatelessScope(initialize_variables=False)``, where Keras defers
    every variable's initializer, so no weight is ever allocated or read (a
    13 kB file declaring a 20000x20000 Dense costs no 1.6 GB)."""
    config = read_model_config(path)
    import keras

    pending = deferred_variables()
    before = len(pending) if pending is not None else 0
    try:
        with keras.StatelessScope(initialize_variables=False):
            model = keras.saving.deserialize_keras_object(config, safe_mode=True)
            specs = [VariableSpec(str(v.path), tuple(int(d) for d in v.shape), str(v.dtype))
                     for v in model.trainable_variables]
    except Exception as error:  # deserialization errors vary by layer and Keras version
        raise ValueError(f"cannot load a Keras model from {path!r}: {error}") from error
    finally:
        if pending is not None:
            # The deferred variables stay registered with Keras, which would
            # initialize (allocate) them at the next StatelessScope's exit.
            del pending[before:]
    if not specs:
        raise ValueError(f"model {path!r} has no trainable variables")
    return specs


def deferred_variables():
    """Keras' variables deferred by a shape-only load, or None: the planner's
    one private Keras use, behind the Keras seam
    (:func:`distadam._keras_internals.deferred_variables`, which says why and
    what the fallback costs). tests/test_planner.py runs the fallback."""
    from distadam import _keras_internals

    return _keras_internals.deferred_variables()
