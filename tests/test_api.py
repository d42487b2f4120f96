"""Constructor surface, validation, serialization and partition bookkeeping
(in-process, default strategy only)."""

import copy
import inspect
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import common
from distadam import ShardedAdam, plan_layout


def test_signature_matches_keras_adam():
    adam = inspect.signature(keras.optimizers.Adam.__init__).parameters
    ours = inspect.signature(ShardedAdam.__init__).parameters
    for name, param in adam.items():
        assert name in ours, f"missing Adam argument {name}"
        if name not in ("name",):
            assert ours[name].default == param.default, name


@pytest.mark.parametrize(
    "kwargs, error, mentions",
    [
        ({"clipnorm": 1.0, "clipvalue": 1.0}, ValueError, "clipnorm"),
        ({"clipnorm": 1.0, "global_clipnorm": 1.0}, ValueError, "global_clipnorm"),
        ({"not_an_argument": 1}, ValueError, "not_an_argument"),
        ({"learning_rate": "fast"}, ValueError, "learning_rate"),
        ({"learning_rate": -0.1}, ValueError, "learning_rate"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"beta_1": 1.0}, ValueError, "beta_1"),
        ({"beta_1": -0.1}, ValueError, "beta_1"),
        ({"beta_2": 1.5}, ValueError, "beta_2"),
        ({"beta_2": "0.9"}, TypeError, "beta_2"),
        ({"epsilon": -1e-8}, ValueError, "epsilon"),
        ({"weight_decay": -0.01}, ValueError, "weight_decay"),
        ({"clipnorm": -1.0}, ValueError, "clipnorm"),
        ({"amsgrad": "yes"}, TypeError, "amsgrad"),
        ({"use_ema": True, "ema_momentum": 1.5}, ValueError, "ema_momentum"),
        ({"use_ema": True, "ema_overwrite_frequency": 0}, ValueError, "ema_overwrite_frequency"),
        ({"gradient_accumulation_steps": 1}, ValueError, "gradient_accumulation_steps"),
        ({"gradient_accumulation_steps": 2.5}, TypeError, "gradient_accumulation_steps"),
        ({"loss_scale_factor": 0.0}, ValueError, "loss_scale_factor"),
        ({"bucket_elements": 0}, ValueError, "bucket_elements"),
        ({"bucket_elements": "Auto"}, ValueError, r"bucket_elements.*or \"auto\": buckets sized from the number of workers"),
        ({"bucket_elements": 1.5}, ValueError, "bucket_elements"),
        ({"shard_alignment": 0}, ValueError, "shard_alignment"),
        ({"backend": 3}, TypeError, "backend"),
        ({"replicate": "embeddings"}, TypeError, "replicate"),
        ({"row_sparse": [""]}, TypeError, "row_sparse"),
        ({"row_sparse": 3}, TypeError, "row_sparse"),
        ({"fused_update": 1}, TypeError, "fused_update"),
        ({"max_consecutive_skips": 0}, ValueError, "max_consecutive_skips"),
        ({"shard_group_size": 0}, ValueError, "shard_group_size"),
        ({"shard_group_size": 2.0}, ValueError, "shard_group_size"),
        ({"shard_group_size": True}, ValueError, "shard_group_size"),
    ],
)
def test_bad_hyperparameters_are_rejected_by_name(kwargs, error, mentions):
    with pytest.raises(error, match=mentions):
        ShardedAdam(**kwargs)


def test_shard_group_size_must_divide_the_workers():
    """Known only at build: one worker here, so only groups of 1 fit; the
    error lists what would."""
    # Named: an unnamed Dense would shift the automatic names other tests expect.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="groups_probe")])
    with pytest.raises(ValueError, match=r"shard_group_size=2 must divide the number of workers \(1\).*\[1\]"):
        ShardedAdam(shard_group_size=2).build(model.trainable_variables)
    optimizer = ShardedAdam(shard_group_size=1)
    optimizer.build(model.trainable_variables)
    assert optimizer.shard_collectives is optimizer.collectives and optimizer.num_shards == 1
    assert ShardedAdam.from_config(optimizer.get_config()).shard_group_size == 1


def test_keras_rejects_what_we_reject_for_clip_combinations():
    # Same message family as Keras for the arguments Keras itself validates.
    with pytest.raises(ValueError, match="Only one of"):
        keras.optimizers.Adam(clipnorm=1.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="Only one of"):
        ShardedAdam(clipnorm=1.0, clipvalue=1.0)


def test_unknown_backend_is_reported_at_build():
    opt = ShardedAdam(backend="carrier-pigeon")
    with pytest.raises(ValueError, match="carrier-pigeon"):
        opt.build([keras.Variable(np.zeros(3, "float32"))])


def test_int_learning_rate_is_accepted_as_float():
    assert float(ShardedAdam(learning_rate=1).learning_rate.numpy()) == 1.0


def test_config_round_trip_with_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=10000, decay_rate=0.96, staircase=True)
    opt = ShardedAdam(learning_rate=schedule, beta_1=0.8, amsgrad=True, global_clipnorm=2.0,
                      use_ema=True, gradient_accumulation_steps=4, bucket_elements=1000, name="opt")
    config = opt.get_config()
    restored = ShardedAdam.from_config(copy.deepcopy(config))
    assert restored.get_config() == config
    generic = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(generic, ShardedAdam)
    assert generic.get_config() == config


def test_auto_buckets_survive_the_config():
    assert ShardedAdam().bucket_elements == 2**22  # the memory-safe default
    opt = ShardedAdam(bucket_elements="auto")
    assert opt.get_config()["bucket_elements"] == "auto"
    assert ShardedAdam.from_config(opt.get_config()).bucket_elements == "auto"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    opt.build(model.trainable_variables)
    assert len(opt.layout.buckets) == 1  # one worker: one float32 bucket of 10M elements at most


def test_introspection_requires_build():
    with pytest.raises(ValueError, match="built"):
        ShardedAdam().state_bytes_per_device()


@pytest.mark.parametrize("fused", [False, True], ids=["op_by_op", "fused"])
def test_single_worker_is_plain_adam_step_by_step(fused):
    """Op by op the update is Keras' own arithmetic, bit for bit; fused by XLA
    it may round differently (contracted multiply-adds), within float noise."""
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 2, 5)]
    ours = [keras.Variable(rng.normal(size=s).astype("float32")) for s in shapes]
    theirs = [keras.Variable(v.numpy()) for v in ours]
    a, b = ShardedAdam(learning_rate=0.01, fused_update=fused), keras.optimizers.Adam(learning_rate=0.01)
    for _ in range(20):
        grads = [tf.constant(rng.normal(size=s).astype("float32")) for s in shapes]
        a.apply_gradients(zip(grads, ours))
        b.apply_gradients(zip(grads, theirs))
    for x, y in zip(ours, theirs):
        if fused:
            np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert a.num_shards == 1
    assert sum(a.state_bytes_per_device().values()) == 2 * 4 * sum(int(np.prod(s)) for s in shapes)


def test_missing_gradient_leaves_variable_and_state_untouched():
    ours = [keras.Variable(np.ones(3, "float32")), keras.Variable(np.ones(2, "float32"))]
    theirs = [keras.Variable(np.ones(3, "float32")), keras.Variable(np.ones(2, "float32"))]
    a, b = ShardedAdam(), keras.optimizers.Adam()
    a.build(ours), b.build(theirs)
    for _ in range(3):
        with pytest.warns(UserWarning):
            a.apply_gradients([(tf.ones(3), ours[0]), (None, ours[1])])
        with pytest.warns(UserWarning):
            b.apply_gradients([(tf.ones(3), theirs[0]), (None, theirs[1])])
    np.testing.assert_array_equal(ours[1].numpy(), np.ones(2))
    np.testing.assert_allclose(ours[0].numpy(), theirs[0].numpy())
    np.testing.assert_array_equal(a.gather_full_state("momentum")[1], np.zeros(2))


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 7])
def test_layout_covers_every_element_once(num_shards):
    variables = [keras.Variable(np.zeros(s, "float32")) for s in [(5, 3), (7,), (1,), (2, 2)]]
    variables.append(keras.Variable(np.zeros((3,), "float16")))
    layout = plan_layout(variables, num_shards)
    assert sorted(b.dtype for b in layout.buckets) == ["float16", "float32"]
    for bucket in layout.buckets:
        covered = []
        for shard in range(num_shards):
            lo, hi = bucket.shard_range(shard)
            covered.extend(range(lo, hi))
            pieces = bucket.owned_pieces(shard)
            assert sum(stop - start for _, start, stop in pieces) == hi - lo
        assert covered == list(range(bucket.num_elements))
        assert 0 <= bucket.padding < num_shards


def test_bucket_cap_splits_by_variable_not_inside_one():
    variables = [keras.Variable(np.zeros(s, "float32")) for s in [(10,), (10,), (25,), (3,)]]
    layout = plan_layout(variables, 2, bucket_elements=20)
    # Last variable first: the order backpropagation produces the gradients.
    assert [[s.variable_index for s in b.segments] for b in layout.buckets] == [[3], [2], [1, 0]]
    assert [[s.size for s in b.segments] for b in layout.buckets] == [[3], [25], [10, 10]]


def test_row_sparse_variables_get_a_bucket_of_their_own():
    variables = [keras.Variable(np.zeros(s, "float32")) for s in [(50, 4), (10,), (7,)]]
    layout = plan_layout(variables, 2, bucket_elements=None, separate=[0])
    assert [[s.variable_index for s in b.segments] for b in layout.buckets] == [[2, 1], [0]]
    # ShardedAdam isolates Keras Embedding tables by name ("embeddings") and
    # by default keeps their state whole (rows exchanged, never the table).
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(20, 4, name="embedding"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="dense")])
    defaults, sharded = ShardedAdam(), ShardedAdam(replicate=[])
    for optimizer in (defaults, sharded):
        optimizer.build(model.trainable_variables)

    def buckets(optimizer):
        # Paths may carry the model's name ("sequential/dense/bias"): compare the ends.
        return [(b.replicated, ["/".join(seg.name.split("/")[-2:]) for seg in b.segments])
                for b in optimizer.layout.buckets]

    assert buckets(defaults) == [(False, ["dense/bias", "dense/kernel"]), (True, ["embedding/embeddings"])]
    assert buckets(sharded) == [(False, ["dense/bias", "dense/kernel"]), (False, ["embedding/embeddings"])]
    # With more than one shard, a bucket under min_shard_elements is kept whole.
    layout = plan_layout(variables, 2, bucket_elements=None, separate=[0], min_shard_elements=50)
    assert [b.replicated for b in layout.buckets] == [True, False]  # 17 elements whole, 200 sharded
    assert plan_layout(variables, 1, bucket_elements=None, min_shard_elements=50).buckets[0].replicated is False
    assert ShardedAdam(min_shard_elements=30).get_config()["min_shard_elements"] == 30
    with pytest.raises(ValueError, match="min_shard_elements"):
        ShardedAdam(min_shard_elements=-1)


def test_replicated_variables_get_whole_buckets_in_gradient_order():
    variables = [keras.Variable(np.zeros(s, "float32")) for s in [(100, 4), (10,), (7,)]]
    layout = plan_layout(variables, 3, bucket_elements=None, replicated=[0])
    assert [(b.replicated, [s.variable_index for s in b.segments]) for b in layout.buckets] == [
        (False, [2, 1]), (True, [0])]
    table = layout.buckets[1]
    assert (table.num_shards, table.shard_size, table.padding) == (1, 400, 0)
    assert table.shard_of_worker(2) == 0 and layout.buckets[0].shard_of_worker(2) == 2
    with pytest.raises(ValueError, match="out of range"):
        plan_layout(variables, 3, replicated=[3])


def test_model_save_and_load_without_custom_objects(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer=ShardedAdam(learning_rate=0.01, amsgrad=True), loss="mse")
    x, y = np.random.default_rng(0).normal(size=(32, 4)), np.zeros((32, 1))
    model.fit(x, y, epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, ShardedAdam)
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    for kind in ("momentum", "velocity", "velocity_hat"):
        for a, b in zip(loaded.optimizer.gather_full_state(kind), model.optimizer.gather_full_state(kind)):
            np.testing.assert_array_equal(a, b)


def test_saved_state_is_plain_adam_state(tmp_path):
    """A ShardedAdam checkpoint continues under keras.optimizers.Adam exactly."""
    def make():
        keras.utils.set_random_seed(3)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])

    x, y = np.random.default_rng(0).normal(size=(64, 4)), np.random.default_rng(1).normal(size=(64, 1))
    model = make()
    model.compile(optimizer=ShardedAdam(learning_rate=0.01), loss="mse")
    model.fit(x[:32], y[:32], batch_size=8, shuffle=False, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    plain = keras.models.load_model(path, custom_objects={}, compile=False)
    plain.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse")
    plain.optimizer.build(plain.trainable_variables)
    store = {}
    model.optimizer.save_own_variables(store)
    plain.optimizer.load_own_variables(store)
    model.fit(x[32:], y[32:], batch_size=8, shuffle=False, verbose=0)
    plain.fit(x[32:], y[32:], batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_jit_compiled_step_matches_adam():
    """The step is XLA-compilable (no host round-trips, static shapes)."""
    def train(optimizer):
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)])
        model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
        rng = np.random.default_rng(2)
        model.fit(rng.normal(size=(96, 6)), rng.normal(size=(96, 2)), batch_size=8, shuffle=False, verbose=0)
        return model.get_weights()

    ours = train(ShardedAdam(learning_rate=0.01, global_clipnorm=1.5, weight_decay=0.01))
    reference = common.DenseGradientAdam(learning_rate=0.01, global_clipnorm=1.5, weight_decay=0.01)
    theirs = train(reference)
    clipped, updates = reference.clipped_updates()
    assert 0 < clipped < updates, "clipping must mix clipped and unclipped updates"
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _trained_model_file(tmp_path, **optimizer_kwargs):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer=ShardedAdam(learning_rate=0.01, **optimizer_kwargs), loss="mse")
    x, y = np.random.default_rng(0).normal(size=(64, 4)), np.random.default_rng(1).normal(size=(64, 1))
    model.fit(x[:32], y[:32], batch_size=8, shuffle=False, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    return model, path, (x, y)


def test_distadam_model_loads_into_plain_adam_in_one_line(tmp_path):
    from distadam.keras_format import load_model_as_adam

    model, path, (x, y) = _trained_model_file(tmp_path, bucket_elements=7, amsgrad=True)
    plain = load_model_as_adam(path)
    assert type(plain.optimizer) is keras.optimizers.Adam
    # Only for that load: distadam's own registration is back.
    assert keras.saving.get_registered_object("distadam>ShardedAdam") is ShardedAdam
    assert type(keras.saving.load_model(path).optimizer) is ShardedAdam
    assert plain.optimizer.amsgrad is True
    assert int(plain.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) == 4
    model.fit(x[32:], y[32:], batch_size=8, shuffle=False, verbose=0)
    plain.fit(x[32:], y[32:], batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_distadam_model_loads_without_distadam_installed(tmp_path):
    """The README's snippet, in a process where `import distadam` fails."""
    import subprocess
    import sys

    model, path, _ = _trained_model_file(tmp_path, shard_alignment=4)
    expected = model.optimizer.gather_full_state("momentum")[0]  # the first kernel's m
    script = f"""
import sys
sys.modules["distadam"] = None  # as if distadam were not installed
import json, keras
adam_keys = keras.optimizers.Adam().get_config()
as_adam = type("AsAdam", (), {{"from_config": staticmethod(lambda c: keras.optimizers.Adam.from_config(
    {{k: v for k, v in c.items() if k in adam_keys}}))}})
model = keras.saving.load_model({str(path)!r}, custom_objects={{"distadam>ShardedAdam": as_adam}})
print("RESULT", json.dumps([type(model.optimizer).__name__, int(model.optimizer.iterations.numpy()),
      model.optimizer.variables[2].numpy().tolist()]))  # Adam: [iteration, learning_rate, m0, ...]
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, iterations, momentum = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert (name, iterations) == ("Adam", 4)
    np.testing.assert_array_equal(np.asarray(momentum), np.asarray(expected))
    # The same snippet is what the README documents.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert 'custom_objects={"distadam>ShardedAdam": as_adam}' in readme


# ------------------------------------- the Keras seam's fallbacks, run
def test_a_keras_without_the_optimizer_hooks_is_refused_with_one_error():
    from distadam import _keras_internals as hooks

    hooks.check_optimizer_hooks()  # this Keras has them
    with pytest.raises(ImportError, match=r"optimizer hooks \['_backend_apply_gradients'"):
        hooks.check_optimizer_hooks(object)


def test_a_changed_keras_trainer_leaves_custom_loops_working(monkeypatch):
    """multiworker_fit's fallback: a Keras whose TF trainer lacks a patched
    piece raises KerasTrainerChanged (an ImportError naming it) from the
    documented call, and nothing is patched."""
    from distadam import _keras_internals as hooks
    from distadam import multiworker_fit

    monkeypatch.setattr(hooks, "TRAINER_HOOKS", hooks.TRAINER_HOOKS + ("TensorFlowTrainer._gone_in_a_new_keras",))
    monkeypatch.setattr(multiworker_fit, "_ORIGINALS", {})
    with pytest.raises(hooks.KerasTrainerChanged, match="_gone_in_a_new_keras"):
        multiworker_fit.enable_multiworker_fit()
    assert multiworker_fit._ORIGINALS == {}
    monkeypatch.setattr(hooks, "TRAINER_MODULE", "keras.src.backend.no_such_trainer")
    with pytest.raises(ImportError, match="is the Keras backend TensorFlow"):
        hooks.tensorflow_trainer()
