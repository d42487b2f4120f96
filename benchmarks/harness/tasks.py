"""The task skeleton the MirroredStrategy and Horovod workers share: build
ShardedAdam and Keras Adam on identical models, then measure memory,
collective launches, bytes per step and interleaved step time. A worker
supplies a :class:`Setup` (how its set-up builds, steps, batches and reads
per-replica values); the tasks are written once."""

from __future__ import annotations

import contextlib
import json
import time

from distadam import cost_model

from harness import accounting, collectives, models, timing

TASKS = ("memory", "collectives", "bytes", "timing")


class Setup:
    """One distribution set-up. ``workers``: collective members;
    ``replicas_in_graph``: replicas whose ops one traced graph holds (N under
    MirroredStrategy, 1 with one process per worker)."""

    workers: int
    replicas_in_graph: int

    def scope(self):
        return contextlib.nullcontext()

    def make_step(self, name, model, optimizer, batch_per_replica):
        """A traced step of optimizer ``name`` ("sharded" or "adam")."""
        raise NotImplementedError

    def batch(self, input_dim, output_dim, batch_per_replica):
        raise NotImplementedError

    def fetch(self, result):
        """Wait for a step's result (a loss) and return it."""
        raise NotImplementedError

    def per_replica(self, totals: dict):
        """How a memory row reports a per-device dict of bytes."""
        return accounting.by_short_device(totals)

    def start_from_the_same_weights(self, pairs, tag):
        """Before timing: make every worker's copies equal (Horovod
        broadcasts; under one strategy they already are)."""

    def backend_info(self, backend) -> dict:
        return {}


def build_pair(setup, make_model, kwargs):
    """(model, optimizer) for ShardedAdam and for Keras Adam, identical
    weights, both built in the set-up's scope."""
    import keras

    import distadam

    pairs = {}
    with setup.scope():
        for name, cls in (("sharded", distadam.ShardedAdam), ("adam", keras.optimizers.Adam)):
            model = make_model()
            optimizer = cls(**kwargs)
            optimizer.build(model.trainable_variables)
            pairs[name] = (model, optimizer)
    return pairs


def mlp_pair(setup, spec, kwargs=None):
    return build_pair(setup, lambda: models.mlp(spec["input_dim"], spec["widths"]), kwargs or {})


def collectives_of(setup, name, model, optimizer, batch_per_replica, input_dim, output_dim):
    """Launches and bytes of one traced step, from the graph and, for
    ShardedAdam, from its backend's own counter."""
    import distadam

    step = setup.make_step(name, model, optimizer, batch_per_replica)
    x, y = setup.batch(input_dim, output_dim, batch_per_replica)
    backend = optimizer.collectives if isinstance(optimizer, distadam.ShardedAdam) else None
    before = dict(backend.launches) if backend else None
    recorder = collectives.CallRecorder(backend) if backend else None
    start = time.perf_counter()
    graph = step.get_concrete_function(x, y).graph
    trace_s = time.perf_counter() - start
    ops = collectives.fill_dynamic_sizes(collectives.traced_collectives(graph), recorder)
    summary = collectives.collective_summary(ops, workers_in_graph=setup.replicas_in_graph, n=setup.workers)
    summary["trace_s"] = trace_s
    if backend is not None:
        # The backend counts calls while tracing; MirroredStrategy traces the
        # replica function once per replica.
        counted = {k: (v - before[k]) / setup.replicas_in_graph for k, v in backend.launches.items()}
        summary["backend_launches_per_step"] = {k: int(v) for k, v in counted.items() if v}
        summary.update(setup.backend_info(backend))
    return summary


def task_memory(setup, configs):
    """Optimizer state per replica for each optimizer configuration."""
    spec = models.MODELS["memory"]
    rows = {}
    for config_name, kwargs in configs.items():
        pairs = mlp_pair(setup, spec, kwargs)
        sharded_model, sharded = pairs["sharded"]
        adam_model, adam = pairs["adam"]
        sharded_vars, adam_vars = sharded_model.trainable_variables, adam_model.trainable_variables
        rows[config_name] = {
            "optimizer_kwargs": kwargs,
            "model": models.model_summary(sharded_model),
            "sharded_bytes_per_replica": setup.per_replica(accounting.optimizer_state_bytes(sharded, sharded_vars)),
            "sharded_reported_bytes_per_replica": setup.per_replica(sharded.state_bytes_per_device()),
            "adam_bytes_per_replica": setup.per_replica(accounting.optimizer_state_bytes(adam, adam_vars)),
            "model_variables_in_optimizer_variables": {
                "sharded": accounting.tracked_model_variables(sharded, sharded_vars),
                "adam": accounting.tracked_model_variables(adam, adam_vars),
            },
            "state_kinds": list(sharded.sharded_state.kinds),
            "num_buckets": len(sharded.layout.buckets),
            "padding_elements": sum(b.padding for b in sharded.layout.buckets),
        }
    return rows


def task_collectives(setup, sizes, baseline_max=None):
    """Launches per step as the variable count grows. ``baseline_max``:
    trace Keras Adam only up to this many variables (None: always)."""
    rows = {}
    for count in sizes:
        pairs = build_pair(setup, lambda: models.many_variables_model(count), {})
        rows[str(count)] = {}
        for name, (model, optimizer) in pairs.items():
            if name == "adam" and baseline_max is not None and count > baseline_max:
                rows[str(count)][name] = {
                    "not_measured": f"baseline traced only up to {baseline_max} variables "
                                    "(--baseline-collective-max): Keras Adam's trace time grows per variable"
                }
                continue
            rows[str(count)][name] = collectives_of(setup, name, model, optimizer, 2, 4, 2)
        rows[str(count)]["model"] = models.model_summary(pairs["sharded"][0])
        rows[str(count)]["model"].pop("variable_shapes")
    return rows


def task_bytes(setup):
    """Communication volume per worker per step on the update-bound model,
    from the traced collectives and the ring cost model."""
    spec = models.MODELS["update_bound"]
    pairs = mlp_pair(setup, spec)
    summary = models.model_summary(pairs["sharded"][0])
    # The ring all-reduce of the gradients, 2Ψ(N−1)/N: the least a full
    # gradient exchange among N workers sends.
    bound = cost_model.bytes_sent("all_reduce", setup.workers, summary["param_bytes"])
    rows = {"param_bytes": summary["param_bytes"], "ring_allreduce_bound": bound}
    for name, (model, optimizer) in pairs.items():
        stats = collectives_of(setup, name, model, optimizer, spec["batch_per_replica"], spec["input_dim"],
                               spec["widths"][-1])
        stats["ratio_to_bound"] = stats["bytes_sent_per_worker"] / bound if bound else None
        rows[name] = stats
    return rows


def task_timing(setup, model_names, repetitions, steps, warmup):
    rows = {}
    for model_name in model_names:
        spec = models.MODELS[model_name]
        pairs = mlp_pair(setup, spec)
        setup.start_from_the_same_weights(pairs, model_name)
        x, y = setup.batch(spec["input_dim"], spec["widths"][-1], spec["batch_per_replica"])
        runners = {}
        for name, (model, optimizer) in pairs.items():
            step = setup.make_step(name, model, optimizer, spec["batch_per_replica"])
            # Fetching the loss waits for the whole step: every replica's
            # update joins the final all-gather / all-reduce.
            runners[name] = (lambda step=step: setup.fetch(step(x, y)))
        samples = timing.interleaved_timing(runners, repetitions, steps, warmup)
        rows[model_name] = {
            "params": models.model_summary(pairs["sharded"][0])["params"],
            "batch_per_replica": spec["batch_per_replica"],
            "sharded": timing.time_stats(samples["sharded"]),
            "adam": timing.time_stats(samples["adam"]),
            "ratio_sharded_over_adam": timing.ratio_stats(samples["sharded"], samples["adam"]),
            "repetitions": repetitions,
            "steps_per_repetition": steps,
        }
    return rows


def run_tasks(setup, args, result, *, memory_configs, baseline_max=None, write=True):
    """Run ``args.tasks`` (comma-separated, of :data:`TASKS`) into
    ``result`` and, if ``write``, save it to ``args.out``."""
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}")
    started = time.perf_counter()
    if "memory" in tasks:
        result["memory"] = task_memory(setup, memory_configs)
    if "collectives" in tasks:
        sizes = [int(s) for s in args.collective_sizes.split(",") if s]
        result["collectives"] = task_collectives(setup, sizes, baseline_max)
    # One worker exchanges nothing: no bytes to measure.
    if "bytes" in tasks and setup.workers > 1:
        result["bytes"] = task_bytes(setup)
    if "timing" in tasks:
        result["timing"] = task_timing(setup, [m for m in args.timing_models.split(",") if m], args.repetitions,
                                       args.steps, args.warmup)
    result["elapsed_s"] = time.perf_counter() - started
    if write:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


def add_task_arguments(parser, repetitions=9):
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--collective-sizes", default="10,100,1000")
    parser.add_argument("--timing-models", default="update_bound,compute_bound")
    parser.add_argument("--repetitions", type=int, default=repetitions)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", required=True)
