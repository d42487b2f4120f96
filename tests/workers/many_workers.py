"""ShardedAdam at a worker count where TensorFlow's rank order differs from
worker order (11 and more), against single-device Keras Adam.

usage: python many_workers.py CASES_JSON OUT_DIR
  under `distadam launch --nproc N` (MultiWorkerMirroredStrategy, one process
  per worker), or alone with DISTADAM_LOGICAL_DEVICES=N (MirroredStrategy over
  N logical CPUs in one process). Every case trains on one strategy, one after
  another; each process writes OUT_DIR/rank{R}-{case index}.npz with its
  weights and what the optimizer observed (member order, group collectives,
  launches). The references come from reference.py, run beside the job: a
  rank training one between collectives would keep the others waiting.

A case: {"name", "kwargs", "schedule", "model": "dense"|"embedding",
"build": "eager"|"lazy", "steps", "mispredict": bool (a wrong predicted member
order)}.
"""

import json
import os
import sys

import common  # noqa: F401  (sets TF logging before TF loads)

import distadam  # noqa: E402

strategy = distadam.strategy_from_env(communication_timeout=300)

import numpy as np  # noqa: E402

cases = json.loads(sys.argv[1])
out_dir = sys.argv[2]
rank = int(os.environ.get("DISTADAM_RANK", "0"))

if any(case.get("mispredict") for case in cases):
    # A wrong prediction of TensorFlow's member order (as for GPUs that
    # TensorFlow chains along their interconnect): the first step must stop
    # before writing anything.
    from distadam.collectives import member_order, tf_distribute

    def reversed_order(device_names, size):
        return member_order.MemberOrder(tuple(reversed(range(size))))

    tf_distribute._predicted_order = reversed_order

for index, case in enumerate(cases):
    steps = case["steps"]
    dense = case.get("model") == "dense"
    data = common.make_data(steps)
    with strategy.scope():
        model = common.make_model(dense=dense)
        optimizer = common.configure(distadam.ShardedAdam(**common.build_kwargs(case)), case)
        if case.get("build") == "eager":
            optimizer.build(model.trainable_variables)
    common.train_custom_loop(strategy, model, optimizer, data, steps)

    collectives = optimizer.collectives
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays["iterations"] = np.array(int(optimizer.iterations.numpy()))
    arrays["replicas"] = np.array(strategy.num_replicas_in_sync)
    arrays["member_order"] = np.array(collectives.member_order.ranked)
    arrays["member_order_source"] = np.array(collectives.member_order_source)
    arrays["group_ops"] = np.array(common.group_ops(optimizer) or "")
    arrays["direct"] = np.array(collectives.uses_direct_collectives)
    arrays["launches"] = np.array(json.dumps(common.step_launches(optimizer)))
    np.savez(os.path.join(out_dir, f"rank{rank}-{index}.npz"), **arrays)
    print(f"rank {rank}: case {case['name']} done", flush=True)
common.exit_now(strategy)
