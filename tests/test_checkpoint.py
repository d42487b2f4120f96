"""Sharded checkpoints: resume exactly, reshard N -> M, integrity, Keras paths."""

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import finish, kill_group, start_worker
from distadam import ShardedAdam
from distadam.checkpoint import CheckpointError, ShardedCheckpointManager

WORKER_COUNTS = (1, 2, 3, 4)


def run_all(jobs, timeout=420):
    """Run worker jobs concurrently, each ``args`` or ``(args, env)``; all must succeed."""
    procs = [start_worker(job[0], **job[1]) if isinstance(job, tuple) else start_worker(job) for job in jobs]
    try:
        for proc in procs:
            out = finish(proc, timeout=timeout)
            assert proc.returncode == 0, f"{proc.args} failed:\n{out[-5000:]}"
    finally:
        for proc in procs:
            kill_group(proc)


def relative(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# The saving runs: (workers, placement). Each trains 30 steps uninterrupted,
# saving at 10 and 12 on the way, so its weights at 30 are what a resume of
# its checkpoint must reach.
SAVES = {
    "1": (1, {}), "2": (2, {}), "3": (3, {}), "4": (4, {}),
    # The Embedding's state replicated: written once, whole.
    "3_replicated": (3, {"replicate": ["embed"]}),
    # Hybrid: one copy of the state (group 0's two shards) is written.
    "4_in_groups_of_2": (4, {"shard_group_size": 2}),
}
# The resumes, by worker count: (placement, saved run) pairs. Not every pair:
# a resume reads element ranges of the global flat state whatever the two
# layouts, so what matters is how old and new shard boundaries overlap. Every
# N = 1..4 resumes itself (exact) and one other count; together they take one
# shard into many (1 -> 4), many into one (4 -> 1), a new shard joined from
# parts of two old ones and an old one split over two new ones (2 -> 3, 3 ->
# 2: the dense bucket's 467 elements split at 234, at 156/312, padded for
# every N > 1); a replicated table into sharded shards and back (3 <-> 2, 3
# -> 4, 3 -> 3); hybrid groups into one group and groups of one (4 in groups
# of 2 -> 2 in groups of 1, 4 in groups of 2, and 3 -> both).
RESUMES = {
    1: [({}, "1"), ({}, "4")],
    2: [({}, "2"), ({}, "3"), ({"shard_group_size": 1}, "4_in_groups_of_2"), ({"shard_group_size": 1}, "3")],
    3: [({}, "3"), ({}, "2"), ({"replicate": ["embed"]}, "3_replicated"), ({"replicate": ["embed"]}, "2")],
    4: [({}, "4"), ({}, "1"), ({}, "3_replicated"),
        ({"shard_group_size": 2}, "4_in_groups_of_2"), ({"shard_group_size": 2}, "3")],
}


@pytest.fixture(scope="module")
def resharding(tmp_path_factory):
    """Every saving run, then every resume (each phase one process per worker count);
    returns (saved directories, {N: resumed results})."""
    root = tmp_path_factory.mktemp("resharding")
    dirs = {name: root / f"saved_{name}" for name in SAVES}
    # One process per worker count (its saves one after another).
    run_all([["ckpt_run.py", n, "save",
              json.dumps([{"placement": placement, "dir": str(dirs[name])}
                          for name, (count, placement) in SAVES.items() if count == n])]
             for n in WORKER_COUNTS])
    outs = {m: root / f"resumed_on_{m}.npz" for m in RESUMES}
    run_all([["ckpt_run.py", m, "resume",
              json.dumps([{"placement": placement, "dir": str(dirs[name])} for placement, name in jobs]), outs[m]]
             for m, jobs in RESUMES.items()])
    return dirs, {m: np.load(out) for m, out in outs.items()}


def test_resharding_plan_covers_every_worker_count():
    assert sorted({n for n, _ in SAVES.values()}) == list(WORKER_COUNTS)
    for m, jobs in RESUMES.items():
        assert ({}, str(m)) in jobs  # exact resume
        assert any(SAVES[name][0] != m for _, name in jobs)  # a different count


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_checkpoints_are_written_as_configured(resharding):
    dirs, _ = resharding
    for name in SAVES:  # max_to_keep=2 kept both saves
        assert [p.name for p in sorted(dirs[name].glob("ckpt-*"))] == ["ckpt-000000000010", "ckpt-000000000012"]
    manifest = (dirs["3_replicated"] / "ckpt-000000000012" / "manifest.json").read_text()
    assert '"placement": "replicated"' in manifest and '"placement": "sharded"' in manifest
    latest = dirs["4_in_groups_of_2"] / "ckpt-000000000012"
    assert sorted(p.name for p in latest.glob("shard-*")) == ["shard-00000-of-00002.npz", "shard-00001-of-00002.npz"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("workers", sorted(RESUMES))
def test_resume_exactly_and_reshard(resharding, workers):
    """Every resume reaches step 30 on the trajectory of the run it resumes:
    exactly when nothing changed, up to float reassociation of the reduction
    when the worker count or the placement did."""
    dirs, resumed = resharding
    result = resumed[workers]
    for run, (placement, name) in enumerate(RESUMES[workers]):
        uninterrupted = np.load(f"{dirs[name]}.uninterrupted.npz")
        n_weights = sum(1 for k in uninterrupted.files if k.startswith("w"))
        assert int(result[f"run{run}_iterations"]) == int(uninterrupted["iterations"]) == 30
        # The schedule resumed at the same step.
        assert float(result[f"run{run}_lr"]) == float(uninterrupted["lr"])
        worst = max(relative(result[f"run{run}_w{i}"], uninterrupted[f"w{i}"]) for i in range(n_weights))
        same = SAVES[name] == (workers, placement)
        assert worst <= (1e-6 if same else 1e-5), (name, placement, worst)
    assert not any(k.startswith(f"run{len(RESUMES[workers])}_") for k in result.files)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_keras_backup_and_restore_resumes_model_fit(tmp_path):
    out = tmp_path / "backup.npz"
    run_all([["ckpt_run.py", 2, "backup", tmp_path / "backup", out]])
    result = np.load(out)
    assert list(result["iterations"]) == [90, 90]
    n_weights = sum(1 for k in result.files if k.startswith("resumed_w"))
    for i in range(n_weights):
        assert relative(result[f"resumed_w{i}"], result[f"straight_w{i}"]) <= 1e-6


# ---------------------------------------------------------------- in-process (N = 1)
def make_trained(seed=0, steps=3):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    optimizer = ShardedAdam(learning_rate=0.01)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(rng.normal(size=(8, 4)).astype("float32"))))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    return model, optimizer


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path):
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer)
    first = manager.save()
    weights_at_first = model.get_weights()
    for v in model.trainable_variables:
        v.assign(v + 1.0)
    optimizer.iterations_variable.assign_add(5)
    latest = manager.save()
    shard = next(latest.glob("shard-*.npz"))
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")

    fresh_model, fresh_optimizer = make_trained(seed=1, steps=0)
    fresh = ShardedCheckpointManager(tmp_path, fresh_model, fresh_optimizer)
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert fresh.restore() == first
    for a, b in zip(fresh_model.get_weights(), weights_at_first):
        np.testing.assert_array_equal(a, b)
    assert int(fresh_optimizer.iterations.numpy()) == 3
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        fresh.restore(latest)


def test_half_written_checkpoint_is_ignored(tmp_path):
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer)
    good = manager.save()
    # A crash after the files but before the manifest leaves a partial dir;
    # a crash mid-rename cannot happen (os.replace is atomic), but a copied
    # directory without manifest can.
    broken = tmp_path / "ckpt-000000000099"
    shutil.copytree(good, broken)
    (broken / "manifest.json").unlink()
    (tmp_path / ".partial-ckpt-000000000100").mkdir()
    fresh_model, fresh_optimizer = make_trained(seed=1, steps=0)
    with pytest.warns(UserWarning, match="no manifest"):
        assert ShardedCheckpointManager(tmp_path, fresh_model, fresh_optimizer).restore() == good


def test_all_checkpoints_unusable_is_an_error_not_a_fresh_start(tmp_path):
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer)
    path = manager.save()
    (path / "model.npz").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="missing file model.npz"):
        manager.restore()


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    model, optimizer = make_trained()
    ShardedCheckpointManager(tmp_path, model, optimizer).save()
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(1)])
    other_optimizer = ShardedAdam()
    other_optimizer.build(other.trainable_variables)
    with pytest.raises(CheckpointError, match="different trainable variables"):
        ShardedCheckpointManager(tmp_path, other, other_optimizer).restore(
            ShardedCheckpointManager(tmp_path, model, optimizer).latest_checkpoint)


def test_manager_requires_built_sharded_adam(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="built distadam.ShardedAdam"):
        ShardedCheckpointManager(tmp_path, model, ShardedAdam())
    with pytest.raises(ValueError, match="max_to_keep"):
        ShardedCheckpointManager(tmp_path, model, ShardedAdam(), max_to_keep=0)


def test_no_checkpoint_returns_none(tmp_path):
    model, optimizer = make_trained()
    assert ShardedCheckpointManager(tmp_path, model, optimizer).restore() is None


def test_tf_train_checkpoint_round_trip(tmp_path):
    model, optimizer = make_trained()
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    # Each shard under a key naming its element range (PerKeyCheckpoint's hooks).
    assert any("ELEMENTS_0_" in name for name, _ in tf.train.list_variables(path))
    saved_state = optimizer.gather_full_state("velocity")
    saved_weights = model.get_weights()
    fresh_model, fresh_optimizer = make_trained(seed=9, steps=2)
    tf.train.Checkpoint(model=fresh_model, optimizer=fresh_optimizer).restore(path).assert_consumed()
    for a, b in zip(fresh_optimizer.gather_full_state("velocity"), saved_state):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fresh_model.get_weights(), saved_weights):
        np.testing.assert_array_equal(a, b)
    assert int(fresh_optimizer.iterations.numpy()) == 3


def test_start_sharded_adam_from_plain_adam_state():
    """Import: a plain keras Adam's state continues under ShardedAdam exactly."""
    def build():
        keras.utils.set_random_seed(4)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)), rng.normal(size=(64, 1))
    plain = build()
    plain.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse")
    plain.fit(x[:32], y[:32], batch_size=8, shuffle=False, verbose=0)
    store = {}
    plain.optimizer.save_own_variables(store)

    sharded = build()
    sharded.set_weights(plain.get_weights())
    sharded.compile(optimizer=ShardedAdam(learning_rate=0.01), loss="mse")
    sharded.optimizer.build(sharded.trainable_variables)
    sharded.optimizer.load_own_variables(store)
    assert int(sharded.optimizer.iterations.numpy()) == 4
    plain.fit(x[32:], y[32:], batch_size=8, shuffle=False, verbose=0)
    sharded.fit(x[32:], y[32:], batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(sharded.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
