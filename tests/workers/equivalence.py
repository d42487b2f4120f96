"""Train the same model with ShardedAdam under MirroredStrategy(N logical CPUs)
and with Keras Adam on one device; print one JSON line per case.

usage: python equivalence.py N CASES_JSON
"""

import json
import os
import sys
import time

import numpy as np

import common  # noqa: F401  (sets TF logging before TF loads)
import reference

num_replicas = int(sys.argv[1])
cases = json.loads(sys.argv[2])
common.use_logical_cpus(num_replicas)

import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402
from distadam.collectives.tf_distribute import DIRECT_COLLECTIVES_ENV  # noqa: E402

strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)])
direct_default = os.environ.get(DIRECT_COLLECTIVES_ENV, "1")

for case in cases:
    started = time.perf_counter()
    steps = case.get("steps", 60)
    data = common.make_data(steps, scale=case.get("target_scale", 1.0))
    fit = case.get("mode", "custom") == "fit"
    expected = reference.get(case, steps, "fit" if fit else "custom")
    reference_done = time.perf_counter()

    dense = case.get("model") == "dense"
    # "portable": this case's optimizer takes the public-API collectives (the
    # backend reads the switch when the optimizer is built).
    os.environ[DIRECT_COLLECTIVES_ENV] = "0" if case.get("portable") else direct_default
    with strategy.scope():
        model = common.make_model(dense=dense)
        opt = common.configure(distadam.ShardedAdam(**common.build_kwargs(case)), case)
        if case.get("build") == "eager":
            # Built before the first step: the layout is checked with one
            # eager all-reduce and the step is traced once, not twice (a
            # first build inside the traced step makes TF trace it again).
            opt.build(model.trainable_variables)

    if fit:
        (tokens, features), targets = data
        model.compile(optimizer=opt, loss="mse", jit_compile=case.get("jit_compile", "auto"))
        model.fit([tokens, features], targets, batch_size=common.GLOBAL_BATCH, shuffle=False, verbose=0)
    else:
        common.train_custom_loop(strategy, model, opt, data, steps)

    weights = model.get_weights()
    result = {
        "case": case["name"],
        "replicas": num_replicas,
        "max_rel_diff": common.max_relative_difference(weights, expected.weights),
        "reference_moved": expected.initial_moved,
        "iterations": int(opt.iterations.numpy()),
        "reference_iterations": expected.iterations,
        "clipped_updates": expected.clipped_updates,
        "state_bytes_per_device": opt.state_bytes_per_device(),
        "direct_collectives": opt.collectives.uses_direct_collectives,
        "fused_update": opt.fused_update,
        "reference_state_bytes": expected.state_bytes,
        "param_counts": [int(np.prod(v.shape)) for v in model.trainable_variables],
        "layout": opt.shard_layout(),
        "placements": ["replicated" if b.replicated else "sharded" for b in opt.layout.buckets],
        # Buckets holding just the Embedding table, whose gradient arrives as rows.
        "sparse_buckets": [b for b, bucket in enumerate(opt.layout.buckets)
                           if [seg.name for seg in bucket.segments] == ["embed/embeddings"]],
        # What the optimizer launched: under hybrid sharding the group view's
        # calls and the all-worker backend's (the view's emulation, if any, and
        # replicated/sparse buckets' exchanges).
        "launches": common.step_launches(opt),
        "group_ops": common.group_ops(opt),
        "norm_statistics": int(bool(case.get("kwargs", {}).get("clipnorm") or case.get("kwargs", {}).get("global_clipnorm"))),
        "mode": case.get("mode", "custom"),
        "skipped_steps": opt.skipped_steps,
        # Where a slow suite's time goes (reported, never asserted).
        "seconds": {"reference": round(reference_done - started, 2),
                    "sharded": round(time.perf_counter() - reference_done, 2)},
    }
    print("RESULT " + json.dumps(result), flush=True)
common.exit_now()
