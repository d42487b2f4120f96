"""One worker of a tf.distribute job training ShardedAdam on test cases.

usage: python train_cases.py CASES_JSON OUT_DIR
  under `distadam launch --nproc N` (MultiWorkerMirroredStrategy, one process
  per worker), or alone with DISTADAM_LOGICAL_DEVICES=N (MirroredStrategy over
  N logical CPUs in one process). The cases train one after another on one
  strategy (TensorFlow allows one per process); for case i each process
  writes OUT_DIR/rank{R}-{i}.npz: its weights and what its optimizer observed
  (member order, group collectives, state bytes, launches). The references
  come from reference.py, run beside the job: a rank training one between
  collectives would keep the others waiting.

A case: {"name", "kwargs", "schedule", "model": "dense"|"embedding",
"build": "eager"|"lazy", "steps",
 "portable": bool (the public-API collectives for this case's optimizer),
 "mismatch": bool (the last rank freezes a layer: a user error the optimizer
   must report clearly instead of hanging or mixing shards),
 "mispredict": bool (a wrong predicted member order)}.
"""

import json
import os
import sys

import common  # noqa: F401  (sets TF logging before TF loads)

import distadam  # noqa: E402

strategy = distadam.strategy_from_env(communication_timeout=300)

import numpy as np  # noqa: E402

from distadam.collectives import member_order, tf_distribute  # noqa: E402

cases = json.loads(sys.argv[1])
out_dir = sys.argv[2]
rank = int(os.environ.get("DISTADAM_RANK", "0"))
last_rank = int(os.environ.get("DISTADAM_WORLD_SIZE", "1")) - 1
direct_default = os.environ.get(tf_distribute.DIRECT_COLLECTIVES_ENV, "1")

if any(case.get("mispredict") for case in cases):
    # A wrong prediction of TensorFlow's member order (as for GPUs that
    # TensorFlow chains along their interconnect): the first step must stop
    # before writing anything.
    def reversed_order(device_names, size):
        return member_order.MemberOrder(tuple(reversed(range(size))))

    tf_distribute._predicted_order = reversed_order

for index, case in enumerate(cases):
    steps = case["steps"]
    dense = case.get("model") == "dense"
    data = common.make_data(steps)
    # The backend reads the switch when the optimizer is built.
    os.environ[tf_distribute.DIRECT_COLLECTIVES_ENV] = "0" if case.get("portable") else direct_default
    with strategy.scope():
        model = common.make_model(dense=dense)
        if case.get("mismatch") and rank == last_rank:
            model.get_layer("nobias").trainable = False
        optimizer = common.configure(distadam.ShardedAdam(**common.build_kwargs(case)), case)
        if case.get("build") == "eager":
            optimizer.build(model.trainable_variables)
    common.train_custom_loop(strategy, model, optimizer, data, steps)

    collectives = optimizer.collectives
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays["iterations"] = np.array(int(optimizer.iterations.numpy()))
    arrays["replicas"] = np.array(strategy.num_replicas_in_sync)
    arrays["num_shards"] = np.array(optimizer.num_shards)
    arrays["state_bytes"] = np.array(list(optimizer.state_bytes_per_device().values()))
    arrays["member_order"] = np.array(collectives.member_order.ranked)
    arrays["member_order_source"] = np.array(collectives.member_order_source)
    arrays["group_ops"] = np.array(common.group_ops(optimizer) or "")
    arrays["direct"] = np.array(collectives.uses_direct_collectives)
    arrays["launches"] = np.array(json.dumps(common.step_launches(optimizer)))
    np.savez(os.path.join(out_dir, f"rank{rank}-{index}.npz"), **arrays)
    print(f"rank {rank}: case {case['name']} done", flush=True)
common.exit_now(strategy)
