"""The single-device Keras Adam reference of a test case, trained once per
test session and cached.

Every equivalence test compares ShardedAdam with ``keras.optimizers.Adam``
(``common.DenseGradientAdam``) on one device over the same global batches.
Many runs share a reference (every N of a case, both collective paths, the
Horovod and MultiWorkerMirroredStrategy suites), so it is trained once and
kept as a file keyed by everything it depends on: the case's reference
arguments, its data, how it trains, the source of this file and of
``common.py``, and the TensorFlow/Keras/NumPy versions. A changed model,
optimizer argument or library makes a new key; nothing stale is ever read.

Where: ``$DISTADAM_REFERENCE_CACHE`` (tests/conftest.py points it at a
directory of the test session; without it, nothing is cached). Writes are
atomic (a temporary file renamed into place), so processes computing the same
reference at once are harmless.

As a program it trains (or finds) the references of a list of cases and
writes them where a test reads them, so a multi-process job's workers never
wait for one of them to train a reference between collectives:

    python reference.py CASES_JSON OUT_DIR      # OUT_DIR/ref-{index}.npz
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import common

CACHE_ENV = "DISTADAM_REFERENCE_CACHE"
_SOURCES = (Path(__file__), Path(common.__file__))
# What a reference depends on in a case (everything else, e.g. the name or
# ShardedAdam's own arguments, does not change it).
_CASE_FIELDS = ("kwargs", "schedule", "exclude_from_weight_decay", "model", "target_scale")


def _versions() -> dict:
    versions = {}
    for name in ("tensorflow-cpu", "tensorflow", "keras", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def key(case: dict, steps: int, loop: str = "custom", repeat: int = 1) -> str:
    """The cache key of a case's reference: ``steps`` global batches of
    ``common.make_data`` (the first ``steps // repeat`` of them, ``repeat``
    times over), trained by a custom loop or by ``model.fit``."""
    relevant = {field: case[field] for field in _CASE_FIELDS if field in case}
    relevant["kwargs"] = common.build_kwargs({"kwargs": case.get("kwargs", {})}, reference=True)
    description = json.dumps({"case": relevant, "steps": steps, "loop": loop, "repeat": repeat,
                              "global_batch": common.GLOBAL_BATCH, "versions": _versions()},
                             sort_keys=True, default=str)
    digest = hashlib.sha256(description.encode())
    for source in _SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:32]


def data(case: dict, steps: int, repeat: int = 1):
    """The global batches a case trains on (``repeat`` passes over the first
    ``steps // repeat``, as an epoch loop sees them)."""
    batches = common.make_data(steps // repeat, scale=case.get("target_scale", 1.0))
    if repeat == 1:
        return batches
    (tokens, features), targets = batches
    return ((np.concatenate([tokens] * repeat), np.concatenate([features] * repeat)),
            np.concatenate([targets] * repeat))


def train(case: dict, steps: int, loop: str = "custom", repeat: int = 1) -> dict:
    """Train the reference: Keras Adam on one device (the default strategy)."""
    import tensorflow as tf

    dense = case.get("model") == "dense"
    model = common.make_model(dense=dense)
    optimizer = common.configure(common.DenseGradientAdam(**common.build_kwargs(case, reference=True)), case)
    batches = data(case, steps, repeat)
    if loop == "fit":
        (tokens, features), targets = batches
        model.compile(optimizer=optimizer, loss="mse")
        model.fit([tokens, features], targets, batch_size=common.GLOBAL_BATCH, shuffle=False, verbose=0)
    else:
        common.train_custom_loop(tf.distribute.get_strategy(), model, optimizer, batches, steps)
    result = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    result["iterations"] = np.array(int(optimizer.iterations.numpy()))
    result["clipped_updates"] = np.array(optimizer.clipped_updates())
    result["state_bytes"] = np.array(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                                         for v in optimizer.variables
                                         if v.name not in ("iteration", "learning_rate")))
    result["initial_moved"] = np.array(common.max_relative_difference(
        common.make_model(dense=dense).get_weights(), [result[f"w{i}"] for i in range(len(model.get_weights()))]))
    return result


class Reference(dict):
    """A trained reference: its arrays by name, plus typed views."""

    @property
    def weights(self) -> list:
        return [self[f"w{i}"] for i in range(sum(1 for k in self if k.startswith("w")))]

    @property
    def clipped_updates(self) -> list:
        return [int(x) for x in self["clipped_updates"]]

    @property
    def iterations(self) -> int:
        return int(self["iterations"])

    @property
    def state_bytes(self) -> int:
        return int(self["state_bytes"])

    @property
    def initial_moved(self) -> float:
        """How far training moved the weights (a reference that did not move
        would make any comparison vacuous)."""
        return float(self["initial_moved"])


def load(path) -> Reference:
    with np.load(path) as arrays:
        return Reference({name: arrays[name] for name in arrays.files})


def save(path, arrays) -> None:
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "wb") as file:
        np.savez(file, **arrays)
    os.replace(temporary, path)


def get(case: dict, steps: int, loop: str = "custom", repeat: int = 1) -> Reference:
    """The case's reference, from the session's cache or trained now."""
    directory = os.environ.get(CACHE_ENV)
    if not directory:
        return Reference(train(case, steps, loop, repeat))
    path = Path(directory) / f"{key(case, steps, loop, repeat)}.npz"
    if path.exists():
        return load(path)
    # Processes that start together (the N of test_equivalence) need the same
    # references: one trains each, the others wait for its file.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return load(path)
        arrays = train(case, steps, loop, repeat)
        save(path, arrays)
    return Reference(arrays)


if __name__ == "__main__":
    cases, out_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
    for index, case in enumerate(cases):
        save(out_dir / f"ref-{index}.npz",
             get(case, case["steps"], case.get("mode", "custom"), case.get("repeat", 1)))
    common.exit_now()
