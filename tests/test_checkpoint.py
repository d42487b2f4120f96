"""Sharded checkpoints: resume exactly, reshard N -> M, integrity, Keras paths."""

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


def assert_resumed_like_uninterrupted(outs, runs=2, tolerance=1e-5):
    """Every resumed run in each of ``outs`` (ckpt_run.py resume) reached
    step 30 with the weights of the uninterrupted run."""
    for out in outs:
        result = np.load(out)
        n_weights = sum(1 for k in result.files if k.startswith("full_w"))
        for run in range(runs):
            assert int(result[f"run{run}_iterations"]) == 30
            worst = max(relative(result[f"run{run}_w{i}"], result[f"full_w{i}"]) for i in range(n_weights))
            assert worst <= tolerance, (out.name, run, worst)


# Which saved worker counts each worker count resumes from: itself (exact
# resume) and one other. Not all 16 ordered pairs: each resume is a fresh
# model, optimizer and traced step in the resuming process, and a resume
# reads element ranges of the global flat state whatever the two counts, so
# what matters is how the old and new shard boundaries overlap. The pairs
# below take every N = 1..4 as a source twice and as a target twice and cover
# each overlap: one shard into many (1 -> 4), many into one (4 -> 1), a new
# shard joined from parts of two old ones and an old one split over two new
# ones (2 -> 3 and 3 -> 2: the dense bucket's 467 elements are split at 234,
# at 156/312, padded for every N > 1), fewer and more workers. Placements and
# hybrid group sizes add 3 -> 2, 3 -> 4, 2 -> 2, 2 -> 4 and 4 -> 2 below.
RESUME_FROM = {1: (1, 4), 2: (2, 3), 3: (3, 2), 4: (4, 1)}


@pytest.mark.timeout(900)
def test_resume_exactly_and_reshard_across_worker_counts(tmp_path):
    assert sorted(n for sources in RESUME_FROM.values() for n in sources) == sorted(WORKER_COUNTS * 2)
    assert all(m in RESUME_FROM[m] for m in WORKER_COUNTS)
    dirs = {n: tmp_path / f"saved_with_{n}" for n in WORKER_COUNTS}
    run_all([["ckpt_run.py", n, "save", dirs[n]] for n in WORKER_COUNTS])
    for n in WORKER_COUNTS:  # max_to_keep=2 kept both saves
        assert [p.name for p in sorted(dirs[n].glob("ckpt-*"))] == ["ckpt-000000000010", "ckpt-000000000012"]
    outs = {m: tmp_path / f"resumed_on_{m}.npz" for m in WORKER_COUNTS}
    run_all([["ckpt_run.py", m, "resume", ",".join(str(dirs[n]) for n in RESUME_FROM[m]), outs[m]]
             for m in WORKER_COUNTS])

    for m in WORKER_COUNTS:
        result = np.load(outs[m])
        n_weights = sum(1 for k in result.files if k.startswith("full_w"))
        assert not any(k.startswith(f"run{len(RESUME_FROM[m])}_") for k in result.files)
        for run, n in enumerate(RESUME_FROM[m]):
            assert int(result[f"run{run}_iterations"]) == 30
            assert float(result[f"run{run}_lr"]) == float(result["full_lr"])  # schedule step identical
            worst = max(relative(result[f"run{run}_w{i}"], result[f"full_w{i}"]) for i in range(n_weights))
            # Same worker count: resume is exact. Different: same trajectory up
            # to float reassociation of the reduction.
            assert worst <= (1e-6 if n == m else 1e-5), (n, m, worst)


@pytest.mark.timeout(900)
def test_reshard_across_placements(tmp_path):
    """A replicated table is written once, whole, and every placement reads
    element ranges: save on 3 workers with the Embedding's state replicated and
    on 2 with everything sharded, resume each on 2 (replicated) and 4 (sharded)."""
    replicated = {"CKPT_PLACEMENT": '{"replicate": ["embed"]}'}
    saved = {"replicated3": tmp_path / "replicated3", "sharded2": tmp_path / "sharded2"}
    run_all([(["ckpt_run.py", 3, "save", saved["replicated3"]], replicated),
             ["ckpt_run.py", 2, "save", saved["sharded2"]]])
    manifest = (saved["replicated3"] / "ckpt-000000000012" / "manifest.json").read_text()
    assert '"placement": "replicated"' in manifest and '"placement": "sharded"' in manifest
    sources = f"{saved['replicated3']},{saved['sharded2']}"
    outs = {"replicated2": tmp_path / "on2.npz", "sharded4": tmp_path / "on4.npz"}
    run_all([(["ckpt_run.py", 2, "resume", sources, outs["replicated2"]], replicated),
             ["ckpt_run.py", 4, "resume", sources, outs["sharded4"]]])
    assert_resumed_like_uninterrupted(outs.values())


@pytest.mark.timeout(900)
def test_reshard_across_group_sizes(tmp_path):
    """Hybrid sharding writes one copy of the state (group 0's shards) and
    restores onto any worker count and group size: save on 4 workers in
    groups of 2 and on 3 workers (one group), resume each on 2 workers in
    groups of 1 and on 4 workers in groups of 2."""
    def groups(size):
        return {"CKPT_PLACEMENT": f'{{"shard_group_size": {size}}}'}

    saved = {"groups_of_2": tmp_path / "four_in_groups_of_2", "one_group": tmp_path / "three"}
    run_all([(["ckpt_run.py", 4, "save", saved["groups_of_2"]], groups(2)),
             ["ckpt_run.py", 3, "save", saved["one_group"]]])
    latest = saved["groups_of_2"] / "ckpt-000000000012"
    assert sorted(p.name for p in latest.glob("shard-*")) == ["shard-00000-of-00002.npz", "shard-00001-of-00002.npz"]
    sources = f"{saved['groups_of_2']},{saved['one_group']}"
    outs = {"groups_of_1": tmp_path / "on2.npz", "groups_of_2": tmp_path / "on4.npz"}
    run_all([(["ckpt_run.py", 2, "resume", sources, outs["groups_of_1"]], groups(1)),
             (["ckpt_run.py", 4, "resume", sources, outs["groups_of_2"]], groups(2))])
    assert_resumed_like_uninterrupted(outs.values())


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
