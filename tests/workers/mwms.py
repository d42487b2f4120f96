"""One MultiWorkerMirroredStrategy worker on 127.0.0.1; rank 0 also trains the
single-device Keras Adam reference and writes both weight sets.

usage: python mwms.py RANK PORT0,PORT1,... CASES_JSON OUT_PREFIX

CASES_JSON: one case or a list, trained one after another on one strategy
(TensorFlow allows one per process); case i writes OUT_PREFIX-i.npz.
"""

import json
import os
import sys

rank = int(sys.argv[1])
ports = sys.argv[2].split(",")
cases = json.loads(sys.argv[3])
cases = cases if isinstance(cases, list) else [cases]
out_prefix = sys.argv[4]
os.environ["TF_CONFIG"] = json.dumps(
    {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": rank}}
)

import common  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=120)
)
assert strategy.num_replicas_in_sync == len(ports), strategy.num_replicas_in_sync
for index, case in enumerate(cases):
    steps = case.get("steps", 30)
    data = common.make_data(steps)
    with strategy.scope():
        # "mismatch": the last rank builds a different model, a user error the
        # optimizer must report clearly instead of hanging or corrupting shards.
        model = common.make_model()
        if case.get("mismatch") and rank == len(ports) - 1:
            model.get_layer("nobias").trainable = False
        opt = common.configure(distadam.ShardedAdam(**common.build_kwargs(case)), case)
        if case.get("build_eagerly"):
            opt.build(model.trainable_variables)
    common.train_custom_loop(strategy, model, opt, data, steps)

    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays["iterations"] = np.array(int(opt.iterations.numpy()))
    arrays["state_bytes"] = np.array(sum(opt.state_bytes_per_device().values()))
    arrays["num_shards"] = np.array(opt.num_shards)
    arrays["group_ops"] = np.array(common.group_ops(opt) or "")
    if rank == 0:
        reference_model = common.make_model()
        reference_opt = common.configure(common.DenseGradientAdam(**common.build_kwargs(case, reference=True)), case)
        common.train_custom_loop(tf.distribute.get_strategy(), reference_model, reference_opt, data, steps)
        arrays.update({f"ref{i}": w for i, w in enumerate(reference_model.get_weights())})
        arrays["clipped_updates"] = np.array(reference_opt.clipped_updates())
        arrays["reference_state_bytes"] = np.array(
            sum(int(np.prod(v.shape)) * 4 for v in reference_opt.variables if v.name not in ("iteration", "learning_rate"))
        )
    np.savez(f"{out_prefix}-{index}.npz", **arrays)
print(f"rank {rank} done", flush=True)
