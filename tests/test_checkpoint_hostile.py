"""Sharded checkpoints against what storage and people do (issue 13, items 1-7).

Each test starts from a valid older checkpoint next to a bad newer one (or a
bad directory entry) and checks that restore() skips the bad one with a
warning that says why and restores the older one exactly, that save() keeps
working, and that nothing is read that should not be.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import tracemalloc

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import WORKERS, worker_env
from distadam import ShardedAdam
from distadam import checkpoint_files
from distadam import checkpoint_space
from distadam.checkpoint import LOCK_FILE, CheckpointError, ShardedCheckpointManager


def make_trained(seed=0, steps=3, num_shards=None):
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


def snapshot(model, optimizer):
    return ([w.copy() for w in model.get_weights()],
            [s.copy() for s in optimizer.gather_full_state("velocity")],
            int(optimizer.iterations_variable.numpy()))


def assert_same(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(x, y)
    assert a[2] == b[2]


@pytest.fixture
def two_checkpoints(tmp_path):
    """A good checkpoint at step 3 (with its exact state) and a newer one at
    step 8 that the test spoils."""
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer)
    good = manager.save()
    saved = snapshot(model, optimizer)
    for v in model.trainable_variables:
        v.assign(v + 1.0)
    optimizer.iterations_variable.assign(8)
    newer = manager.save()
    manager.close()
    return tmp_path, good, saved, newer


def restore_fresh(directory, path=None):
    model, optimizer = make_trained(seed=1, steps=0)
    with ShardedCheckpointManager(directory, model, optimizer) as manager:
        restored = manager.restore(path)
    return restored, model, optimizer


def reseal(checkpoint, mutate):
    """Edit a manifest *and* recompute its digest, as a tool (or a person
    who read the format) would: the checks past the digest must hold."""
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text())
    mutate(manifest)
    path.write_bytes(checkpoint_files.seal_manifest(manifest))


def replace_file(checkpoint, name, data: bytes):
    """Replace a file and update its manifest entry so its checksum matches."""
    (checkpoint / name).write_bytes(data)
    reseal(checkpoint, lambda m: m["files"].__setitem__(
        name, {"size": len(data), "sha256": checkpoint_files.sha256_hex(data)}))


def npz_bytes(**arrays):
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def shard_arrays(checkpoint, name):
    with np.load(checkpoint / name) as data:
        return {k: data[k] for k in data.files}


def expect_fallback(directory, good, saved, reason):
    with pytest.warns(UserWarning, match=reason):
        restored, model, optimizer = restore_fresh(directory)
    assert restored == good
    assert_same(snapshot(model, optimizer), saved)


# ------------------------------------------------------------------ item 1
def test_names_that_are_not_ours_are_ignored_by_restore_save_and_pruning(tmp_path):
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer, max_to_keep=1)
    good = manager.save()
    saved = snapshot(model, optimizer)
    shutil.copytree(good, tmp_path / "ckpt-000000000008.bak")
    (tmp_path / "ckpt-latest").symlink_to(good.name)
    (tmp_path / "ckpt-000000000009").write_text("a file, not a checkpoint")
    (tmp_path / "ckpt-0000000000010").mkdir()            # 13 digits: not the canonical name
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    shutil.copytree(good, elsewhere)
    (tmp_path / "ckpt-000000000011").symlink_to(elsewhere)  # a symlink under a valid name
    assert manager.checkpoints() == [good]

    restored, fresh_model, fresh_optimizer = restore_fresh(tmp_path)
    assert restored == good
    assert_same(snapshot(fresh_model, fresh_optimizer), saved)

    optimizer.iterations_variable.assign(20)
    newest = manager.save()                      # pruning (max_to_keep=1) touches only ours
    assert manager.checkpoints() == [newest]
    for name in ("ckpt-000000000008.bak", "ckpt-latest", "ckpt-000000000009", "ckpt-0000000000010",
                 "ckpt-000000000011"):
        assert os.path.lexists(tmp_path / name), name
    assert (elsewhere / "manifest.json").exists()


# ------------------------------------------------------------------ item 2
@pytest.mark.timeout(120)  # reading a FIFO or /dev/zero would hang: the guard fails the test
@pytest.mark.parametrize("entry", ["../outside.npz", "/dev/zero", "sub/model.npz", "fifo.npz"])
def test_manifest_names_only_files_inside_the_checkpoint(two_checkpoints, entry):
    directory, good, saved, newer = two_checkpoints
    os.mkfifo(directory / "outside.npz")
    os.mkfifo(newer / "fifo.npz")

    def swap(manifest):
        manifest["files"][entry] = manifest["files"].pop("model.npz")

    reseal(newer, swap)
    expect_fallback(directory, good, saved, "not this checkpoint's")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("planted", ["symlink-dev-zero", "symlink-outside", "fifo", "directory"])
def test_listed_files_must_be_regular_files_not_symlinks(two_checkpoints, planted):
    directory, good, saved, newer = two_checkpoints
    target = newer / "model.npz"
    target.unlink()
    if planted == "symlink-dev-zero":
        target.symlink_to("/dev/zero")
    elif planted == "symlink-outside":
        target.symlink_to(good / "model.npz")
    elif planted == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    expect_fallback(directory, good, saved, "model.npz is (a symlink|not a regular file)")


def test_huge_shard_count_is_rejected_before_anything_is_built(two_checkpoints):
    directory, good, saved, newer = two_checkpoints
    reseal(newer, lambda m: m["sharded"].__setitem__("num_shards", 10**7))
    tracemalloc.start()
    try:
        expect_fallback(directory, good, saved, "num_shards is 10000000, expected at most")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"restore allocated {peak} bytes for a crafted shard count"


def test_sizes_are_checked_against_the_model_before_reading(two_checkpoints):
    directory, good, saved, newer = two_checkpoints
    # The manifest claims a size no file of this model can have ...
    reseal(newer, lambda m: m["files"]["model.npz"].__setitem__("size", 10**10))
    expect_fallback(directory, good, saved, "holds at most")


# ------------------------------------------------------------------ item 3
def test_an_edited_manifest_is_detected(two_checkpoints):
    directory, good, saved, newer = two_checkpoints
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["step"] = 999
    (newer / "manifest.json").write_text(json.dumps(manifest))
    expect_fallback(directory, good, saved, "digest mismatch")


def test_manifest_step_must_match_the_directory(two_checkpoints):
    directory, good, saved, newer = two_checkpoints
    reseal(newer, lambda m: m.__setitem__("step", 999))  # even with a recomputed digest
    expect_fallback(directory, good, saved, "named for step 8 but its manifest says 999")


# ------------------------------------------------------------------ item 4
def bad_shard(kind):
    """Shard-file contents that pass a checksum (the manifest is updated) but
    are wrong for the layout."""

    def make(arrays):
        key = next(k for k in arrays if k.startswith("velocity/"))
        if kind == "garbage":
            return b"PK\x03\x04" + os.urandom(300)
        if kind == "huge":  # an array of 5M elements where a few dozen belong
            return npz_bytes(**dict(arrays, **{key: np.zeros(5_000_000, np.float32)}))
        if kind == "broadcasts":  # one element: would broadcast into the slice
            return npz_bytes(**dict(arrays, **{key: arrays[key][:1]}))
        if kind == "dtype":
            return npz_bytes(**dict(arrays, **{key: arrays[key].astype(np.float64)}))
        if kind == "pickle":
            return npz_bytes(**dict(arrays, **{key: np.array([object()] * len(arrays[key]), dtype=object)}))
        if kind == "compressed":
            import io

            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            return buffer.getvalue()
        if kind == "range":
            return npz_bytes(**dict(arrays, **{"range/0": arrays["range/0"] + 1}))
        if kind == "step":
            return npz_bytes(**dict(arrays, iterations=np.asarray(999, np.int64)))
        if kind == "missing-array":
            return npz_bytes(**{k: v for k, v in arrays.items() if k != key})
        if kind == "truncated-data":
            data = npz_bytes(**arrays)
            return data[: len(data) // 2]
        raise AssertionError(kind)

    return make


REASONS = {
    "garbage": "not a valid .npz", "huge": "more than|holds at most", "broadcasts": r"shape \(1,\)",
    "dtype": "dtype float64", "pickle": "dtype object|Python objects", "compressed": "compressed",
    "range": "holds elements", "step": "holds step 999", "missing-array": "wrong arrays",
    "truncated-data": "not a valid .npz|runs past|truncated",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_shard_contents_are_checked_against_the_layout(two_checkpoints, kind):
    directory, good, saved, newer = two_checkpoints
    name = "shard-00000-of-00001.npz"
    replace_file(newer, name, bad_shard(kind)(shard_arrays(newer, name)))
    expect_fallback(directory, good, saved, REASONS[kind])


def test_model_weights_are_checked_too(two_checkpoints):
    directory, good, saved, newer = two_checkpoints
    arrays = shard_arrays(newer, "model.npz")
    arrays["w0"] = arrays["w0"][:1]  # (1, 3) instead of (4, 3): would fail or broadcast late
    replace_file(newer, "model.npz", npz_bytes(**arrays))
    expect_fallback(directory, good, saved, r"w0 has shape \(1, 3\)")


# ------------------------------------------------------------------ item 5
def test_restore_is_all_or_nothing(two_checkpoints):
    """A checkpoint whose weights are fine but whose shard is bad changes
    nothing: not the weights, not the state, not the step."""
    directory, good, saved, newer = two_checkpoints
    replace_file(newer, "shard-00000-of-00001.npz", b"not an npz at all")
    model, optimizer = make_trained(seed=1, steps=2)
    before = snapshot(model, optimizer)
    with ShardedCheckpointManager(directory, model, optimizer) as manager:
        with pytest.raises(CheckpointError, match="not a valid .npz"):
            manager.restore(newer)
    assert_same(snapshot(model, optimizer), before)


def test_any_failure_of_a_checkpoint_falls_back(two_checkpoints, monkeypatch):
    """Not only checksum mismatches: an unexpected error while reading (here
    an I/O error) skips the checkpoint too."""
    directory, good, saved, newer = two_checkpoints
    real = checkpoint_files.read_regular_file

    def flaky(folder, name, *args, **kwargs):
        if str(folder) == str(newer) and name.startswith("shard-"):
            raise OSError(errno.EIO, "Input/output error")
        return real(folder, name, *args, **kwargs)

    monkeypatch.setattr(checkpoint_files, "read_regular_file", flaky)
    expect_fallback(directory, good, saved, "Input/output error")


# ------------------------------------------------------------------ item 6
def failing_savez(after_bytes=100):
    real = np.savez

    def savez(handle, **arrays):
        handle.write(b"\0" * after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return real, savez


def test_disk_full_save_cleans_up_says_how_much_and_does_not_wedge(tmp_path, monkeypatch):
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer, max_to_keep=2)
    manager.save()
    optimizer.iterations_variable.assign(8)
    second = manager.save()
    saved = snapshot(model, optimizer)

    optimizer.iterations_variable.assign(13)
    real, savez = failing_savez()
    monkeypatch.setattr(np, "savez", savez)
    needed = manager.bytes_needed()
    with pytest.raises(CheckpointError, match=f"No space left.*needs up to {needed:,} bytes"):
        manager.save()
    assert checkpoint_files.list_partials(tmp_path) == [], "the failed save left files behind"
    assert [p.name for p in manager.checkpoints()] == ["ckpt-000000000003", "ckpt-000000000008"]
    assert needed >= sum(os.path.getsize(p) for p in second.iterdir())

    monkeypatch.setattr(np, "savez", real)  # space is back: the next save works and prunes
    optimizer.iterations_variable.assign(21)
    manager.save()
    assert [p.name for p in manager.checkpoints()] == ["ckpt-000000000008", "ckpt-000000000021"]
    restored, fresh_model, fresh_optimizer = restore_fresh(tmp_path, second)
    assert_same(snapshot(fresh_model, fresh_optimizer), saved)


def test_crashed_saves_leftovers_are_removed_by_the_next_save(tmp_path):
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer)
    (tmp_path / ".partial-ckpt-000000000001").mkdir()                      # old format
    (tmp_path / ".partial-ckpt-000000000002-0123456789abcdef").mkdir()     # a dead job's
    manager.save()
    assert checkpoint_files.list_partials(tmp_path) == []


def test_low_space_prunes_early_and_refuses_clearly(tmp_path, monkeypatch):
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer, max_to_keep=3)
    for step in (3, 4, 5):
        optimizer.iterations_variable.assign(step)
        manager.save()
    needed = manager.bytes_needed()
    usage = shutil.disk_usage(tmp_path)

    def room_with_two_checkpoints(path):
        # The volume is full while 3 checkpoints are on it.
        count = len(manager.checkpoints())
        return usage._replace(free=needed - 1 if count >= 3 else needed)

    monkeypatch.setattr(checkpoint_space.shutil, "disk_usage", room_with_two_checkpoints)
    optimizer.iterations_variable.assign(6)
    with pytest.warns(UserWarning, match="deleting ckpt-000000000003 before saving"):
        manager.save()
    assert [p.name[-1] for p in manager.checkpoints()] == ["4", "5", "6"]

    monkeypatch.setattr(checkpoint_space.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    optimizer.iterations_variable.assign(7)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=f"needs up to {needed:,} bytes.*1,000 bytes are free"):
        manager.save()
    # It pruned only what this save would have pruned and kept the newest.
    assert [p.name[-1] for p in manager.checkpoints()] == ["5", "6"]
    assert checkpoint_files.list_partials(tmp_path) == []


# ------------------------------------------------------------------ item 7
@pytest.mark.timeout(300)
def test_a_second_job_on_the_same_directory_fails_clearly(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, str(WORKERS / "hold_checkpoint_dir.py"), str(tmp_path)],
        cwd=WORKERS, env=worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = holder.stdout.readline()
        while line and not line.startswith("holding"):
            line = holder.stdout.readline()
        assert line.startswith("holding"), "the other job did not start"
        model, optimizer = make_trained()
        manager = ShardedCheckpointManager(tmp_path, model, optimizer)
        with pytest.raises(CheckpointError, match=f"being written by another job .*pid {holder.pid}"):
            manager.save()
        assert checkpoint_files.list_partials(tmp_path) == []
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        finally:
            if holder.poll() is None:
                os.killpg(holder.pid, 9)
                holder.wait()
    # Once the other job is gone (a restart), this one takes over at once.
    assert manager.save() == tmp_path / "ckpt-000000000003"


def test_a_takeover_is_detected_at_the_next_save(tmp_path):
    """On storage that accepts flock without enforcing it, both jobs get the
    lock; the writer record still catches the second one."""
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer)
    first = manager.save()
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"job": "feedfacefeedface", "host": "other-pod", "pid": 1, "since": "now"}))
    optimizer.iterations_variable.assign(9)
    with pytest.raises(CheckpointError, match="another job took over .*other-pod"):
        manager.save()
    assert manager.checkpoints() == [first]
    assert checkpoint_files.list_partials(tmp_path) == []
    manager.close()


def test_read_only_manager_restores_next_to_a_writer(two_checkpoints):
    directory, good, saved, newer = two_checkpoints
    model, optimizer = make_trained()
    writer = ShardedCheckpointManager(directory, model, optimizer)
    optimizer.iterations_variable.assign(10)
    writer.save()
    newer = directory / "ckpt-000000000010"
    reader_model, reader_optimizer = make_trained(seed=2, steps=0)
    reader = ShardedCheckpointManager(directory, reader_model, reader_optimizer, read_only=True)
    assert reader.restore() == newer
    with pytest.raises(CheckpointError, match="read-only"):
        reader.save()
    writer.close()


def test_save_replaces_a_symlink_planted_under_its_name_without_following_it(tmp_path):
    model, optimizer = make_trained()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("not a checkpoint")
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "ckpt-000000000003").symlink_to(elsewhere)
    saved = ShardedCheckpointManager(directory, model, optimizer).save()
    assert saved.is_dir() and not saved.is_symlink() and (saved / "manifest.json").exists()
    assert (elsewhere / "precious.txt").read_text() == "not a checkpoint"


# ------------------------------------------------- issue 25, items 1-3 and 9
def test_a_full_disk_while_taking_the_writer_lock_does_not_wedge_later_saves(tmp_path, monkeypatch):
    """ENOSPC while writing the writer record: a clear CheckpointError (which
    every process of a job learns through the agreement), the lock's file
    descriptor closed, and the next save, once space is back, works."""
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer)
    real = os.pwrite

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(CheckpointError, match="writer record .*No space left.*later saves will retry"):
        manager.save()
    monkeypatch.setattr(os, "pwrite", real)
    assert manager.save() == tmp_path / "ckpt-000000000003"
    manager.close()


def test_resaving_the_committed_step_keeps_it_when_the_replacement_fails(tmp_path, monkeypatch):
    """The SIGTERM save right after a periodic save writes the same step
    again: until the new copy is committed the old one stays whole."""
    model, optimizer = make_trained()
    manager = ShardedCheckpointManager(tmp_path, model, optimizer)
    first = manager.save()
    saved = snapshot(model, optimizer)
    for v in model.trainable_variables:
        v.assign(v + 1.0)
    real = os.replace

    def rename_fails(src, dst, *args, **kwargs):
        if str(dst) == str(first) and checkpoint_files.PARTIAL_PREFIX in str(src):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", rename_fails)
    with pytest.raises(CheckpointError, match="Input/output error"):
        manager.save()
    monkeypatch.setattr(os, "replace", real)
    assert manager.checkpoints() == [first]
    restored, fresh_model, fresh_optimizer = restore_fresh(tmp_path)
    assert restored == first
    assert_same(snapshot(fresh_model, fresh_optimizer), saved)

    changed = snapshot(model, optimizer)         # a re-save that succeeds replaces it
    assert manager.save() == first
    restored, fresh_model, fresh_optimizer = restore_fresh(tmp_path)
    assert_same(snapshot(fresh_model, fresh_optimizer), changed)
    assert checkpoint_files.list_superseded(tmp_path) == []
    manager.close()


def test_a_save_killed_while_replacing_its_step_leaves_the_old_copy_usable(tmp_path):
    model, optimizer = make_trained()
    with ShardedCheckpointManager(tmp_path, model, optimizer) as manager:
        first = manager.save()
    saved = snapshot(model, optimizer)
    # What a kill between moving the committed copy aside and renaming the
    # replacement into place leaves behind:
    aside = tmp_path / checkpoint_files.superseded_name(3)
    os.replace(first, aside)
    shutil.copytree(aside, tmp_path / checkpoint_files.partial_name(3, "0123456789abcdef"))
    restored, fresh_model, fresh_optimizer = restore_fresh(tmp_path)
    assert restored == aside
    assert_same(snapshot(fresh_model, fresh_optimizer), saved)
    # The restarted job's first save puts it back under its name and cleans up.
    fresh_optimizer.iterations_variable.assign(5)
    with ShardedCheckpointManager(tmp_path, fresh_model, fresh_optimizer) as manager:
        manager.save()
    assert [p.name for p in manager.checkpoints()] == ["ckpt-000000000003", "ckpt-000000000005"]
    assert checkpoint_files.list_superseded(tmp_path) == checkpoint_files.list_partials(tmp_path) == []


@pytest.mark.parametrize("value", [-1.0, 1e300], ids=["negative", "beyond-float32"])
def test_a_learning_rate_the_first_step_would_choke_on_falls_back(two_checkpoints, value):
    directory, good, saved, newer = two_checkpoints
    reseal(newer, lambda m: m.__setitem__("learning_rate_value", value))
    expect_fallback(directory, good, saved, "learning_rate_value")


def test_a_step_beyond_the_int64_counter_falls_back(two_checkpoints):
    directory, good, saved, newer = two_checkpoints
    huge = 1 << 64
    reseal(newer, lambda m: m.__setitem__("step", huge))
    os.replace(newer, directory / checkpoint_files.checkpoint_name(huge))
    expect_fallback(directory, good, saved, "field step")


def test_unknown_manifest_keys_are_refused(two_checkpoints):
    directory, good, saved, newer = two_checkpoints
    reseal(newer, lambda m: m["sharded"]["buckets"][0].__setitem__("compression", "zstd"))
    expect_fallback(directory, good, saved, r"buckets\[0\] has keys this format does not have.*compression")
    reseal(newer, lambda m: (m["sharded"]["buckets"][0].pop("compression"), m.__setitem__("extra", 1)))
    expect_fallback(directory, good, saved, r"\(top level\) has keys this format does not have.*extra")


def test_a_manifest_larger_than_this_models_can_be_is_not_parsed(two_checkpoints, monkeypatch):
    directory, good, saved, newer = two_checkpoints
    reseal(newer, lambda m: m.__setitem__("job", "x" * (1 << 20)))
    parsed = []
    real = checkpoint_files.open_manifest
    monkeypatch.setattr(checkpoint_files, "open_manifest", lambda data: parsed.append(len(data)) or real(data))
    expect_fallback(directory, good, saved, r"manifest.json has \d+ bytes, more than the \d+")
    assert max(parsed) < 1 << 16, "the oversized manifest was parsed"


def test_a_tensorflow_without_the_checkpoint_hooks_is_refused_at_import():
    """The fallback of the one private TensorFlow checkpoint use (state.py's
    per-worker keys), run: a Trackable without the hooks is refused with a
    clear error, since saving one value for every shard would mix the state."""
    from distadam import _tf_internals

    _tf_internals.check_checkpoint_hooks()  # this TensorFlow has them

    class OldTrackable:
        def _restore_from_tensors(self, restored):
            return restored

    with pytest.raises(ImportError, match=r"checkpoint hook Trackable._serialize_to_tensors.*one value for every worker"):
        _tf_internals.check_checkpoint_hooks(OldTrackable)
