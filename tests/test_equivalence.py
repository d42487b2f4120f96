"""ShardedAdam under MirroredStrategy(N) == Keras Adam on one device, global batch.

Each N runs in its own process (one strategy per process); all cases of one N
share that process, a class-scoped fixture of that N's test class (one
pytest-xdist unit under --dist loadscope: the N spread over the workers, each
run once). The reference is ``keras.optimizers.Adam`` on the
mean gradient of the global batch (densified: see DenseGradientAdam)."""

import json
import re

import pytest

from conftest import finish, kill_group, start_worker
from distadam.collectives.tf_distribute import direct_collectives_requested

REPLICAS = (1, 2, 3, 4)
TOLERANCE = 1e-5
# Enough updates for the state to matter (bias correction fades, EMA
# overwrites and the staircase schedule fire several times, accumulation makes
# 10-15 updates) and for every clipping case to mix clipped and unclipped
# updates (asserted). A case's cost is mostly tracing and XLA compilation,
# not steps.
STEPS = 30

CASES = [
    {"name": "defaults"},
    {"name": "defaults_model_fit", "mode": "fit"},
    {"name": "amsgrad", "kwargs": {"amsgrad": True}},
    {"name": "weight_decay_with_exclusion", "kwargs": {"weight_decay": 0.05},
     "exclude_from_weight_decay": ["bias"]},
    # Clipping thresholds are chosen so that some updates are clipped and some
    # are not: Adam ignores a constant gradient scale, so a case clipped on
    # every step could not see a gradient-scale bug (e.g. summing instead of
    # averaging over workers).
    {"name": "clipnorm", "kwargs": {"clipnorm": 0.5}},
    {"name": "clipvalue", "kwargs": {"clipvalue": 0.4}},
    {"name": "global_clipnorm", "kwargs": {"global_clipnorm": 0.8}},
    {"name": "exponential_decay_staircase",
     "schedule": {"initial_learning_rate": 0.01, "decay_steps": 10, "decay_rate": 0.5, "staircase": True}},
    {"name": "use_ema_overwrite", "kwargs": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 7}},
    {"name": "use_ema_finalize_model_fit", "mode": "fit", "kwargs": {"use_ema": True}},
    {"name": "gradient_accumulation", "kwargs": {"gradient_accumulation_steps": 3}},
    # Keras clips the accumulated mean, not each micro-batch's gradient.
    {"name": "gradient_accumulation_global_clipnorm_model_fit", "mode": "fit",
     "kwargs": {"gradient_accumulation_steps": 2, "global_clipnorm": 0.8}},
    # Sparse gradients. The Embedding (30 x 6) has a bucket of its own by
    # default (row_sparse), so its IndexedSlices gradient is exchanged as
    # rows (every case above does that); every batch repeats ids, so
    # duplicate rows must add up. Here: small buckets, and the table sharing
    # a bucket (its gradient densified).
    {"name": "small_buckets_clipnorm_accumulation_model_fit", "mode": "fit",
     "kwargs": {"bucket_elements": 150, "clipnorm": 0.5, "gradient_accumulation_steps": 2}},
    {"name": "embedding_densified_loss_scale_weight_decay",
     "kwargs": {"row_sparse": [], "loss_scale_factor": 64.0, "weight_decay": 0.02}},
    # Replicated placement: the table's state stays whole on every worker;
    # its squares count once in the global norm.
    {"name": "replicated_embedding_global_clipnorm",
     "kwargs": {"replicate": ["embed"], "global_clipnorm": 0.8}, "replicated_buckets": 1},
    {"name": "replicated_dense_kernel_amsgrad_ema",
     "kwargs": {"replicate": ["hidden/kernel"], "amsgrad": True, "use_ema": True, "ema_overwrite_frequency": 9},
     "replicated_buckets": 1},
    {"name": "loss_scale_amsgrad_global_clip_model_fit", "mode": "fit",
     "kwargs": {"loss_scale_factor": 128.0, "amsgrad": True, "global_clipnorm": 0.8,
                "weight_decay": 0.01, "learning_rate": 0.003}},
    # Padding never decides a step: with epsilon=0 the padded elements of an
    # uneven shard compute 0/0 = NaN, which must not skip steps (the model is
    # dense so that every real element gets a gradient and Keras Adam stays
    # finite too). N = 3 only, where shards are padded.
    {"name": "epsilon_zero_padded", "kwargs": {"epsilon": 0.0}, "model": "dense"},
]
# Hybrid sharding (shard_group_size=G < N): the state is sharded within groups
# of G workers and replicated across groups. Run at N = 4: G = 2 (two groups
# of two) and G = 1 (every worker holds everything; the shards are only
# all-reduced). The norm-clipping cases check the statistics are counted once
# per element, not once per group; the sparse Embedding gradient's rows come
# from all four workers into each group's shards.
HYBRID_REPLICAS = 4
HYBRID_CASES = [
    {"name": "groups_of_2_defaults_model_fit", "mode": "fit", "kwargs": {"shard_group_size": 2}},
    {"name": "groups_of_2_clipnorm_amsgrad", "kwargs": {"shard_group_size": 2, "clipnorm": 0.5, "amsgrad": True}},
    {"name": "groups_of_2_global_clipnorm_replicated_embedding",
     "kwargs": {"shard_group_size": 2, "global_clipnorm": 0.8, "replicate": ["embed"]}, "replicated_buckets": 1},
    {"name": "groups_of_2_accumulation_ema_weight_decay_small_buckets",
     "kwargs": {"shard_group_size": 2, "gradient_accumulation_steps": 2, "use_ema": True, "weight_decay": 0.02,
                "bucket_elements": 150}},
    {"name": "groups_of_1_global_clipnorm", "kwargs": {"shard_group_size": 1, "global_clipnorm": 0.8}},
]
CASES += HYBRID_CASES
# Custom-loop cases build the optimizer before the first step (as README's
# "build eagerly" advice; model.fit does that too), which traces the step once
# instead of twice. These keep the other path, the first build inside the
# traced step, where the workers' layout check cannot run eagerly and rides on
# the all-gathers: the plain step, both replicated placements (a replicated
# bucket is never gathered), and hybrid groups (gathers within a group; none
# for groups of one).
LAZY_BUILD = ("defaults", "replicated_embedding_global_clipnorm", "replicated_dense_kernel_amsgrad_ema",
              "groups_of_2_clipnorm_amsgrad", "groups_of_1_global_clipnorm")
for case in CASES:
    case["steps"] = STEPS
    if case.get("mode", "custom") == "custom":
        case["build"] = "lazy" if case["name"] in LAZY_BUILD else "eager"
assert all(any(c["name"] == name for c in CASES) for name in LAZY_BUILD)

# One worker owns every element: no exchange, no padding, nothing uneven. It
# runs the cases whose step takes a different path (model.fit, the norm
# statistics, accumulation, sparse rows densified or kept whole), not every
# hyper-parameter again (each case costs a process's worth of tracing).
ONE_WORKER_CASES = ("defaults", "defaults_model_fit", "global_clipnorm", "gradient_accumulation",
                    "embedding_densified_loss_scale_weight_decay", "replicated_embedding_global_clipnorm")
# Cases whose only sharding-sensitive part is elementwise on the shard (the
# update rule, the schedule, the EMA overwrite of the worker's own elements,
# the accumulator): N = 3, uneven and padded, is where a shard boundary could
# go wrong, so they run there only. The others run at every N.
ELEMENTWISE_CASES = ("amsgrad", "clipvalue", "exponential_decay_staircase", "use_ema_overwrite",
                     "replicated_dense_kernel_amsgrad_ema", "epsilon_zero_padded")
ELEMENTWISE_REPLICAS = 3
# N = 4 (even shards, four members in every exchange) runs the cases whose
# exchange or statistics differ: the plain step and model.fit, both norm
# clippings, accumulation under model.fit, several buckets, the densified
# table with loss scaling, and the replicated table; N = 2 and 3 run the rest.
FOUR_WORKER_CASES = ("defaults", "defaults_model_fit", "global_clipnorm",
                     "gradient_accumulation_global_clipnorm_model_fit",
                     "embedding_densified_loss_scale_weight_decay", "replicated_embedding_global_clipnorm")
# The portable (public-API) collectives, which NCCL/TPU strategies take and
# DISTADAM_DIRECT_COLLECTIVES=0 forces, on a covering set run inside the same
# worker processes (the switch is read when an optimizer is built): several
# buckets, model.fit, accumulation and norm statistics; a replicated
# Embedding with the global norm; the eager gather of EMA finalisation; the
# layout and member-order check riding on the gathers (a first build inside
# the step); and, at N = 4, groups of 2 emulated over all workers.
PORTABLE_CASES = {
    2: ("defaults_model_fit", "defaults"),
    3: ("small_buckets_clipnorm_accumulation_model_fit", "replicated_embedding_global_clipnorm",
        "use_ema_finalize_model_fit"),
    HYBRID_REPLICAS: ("groups_of_2_clipnorm_amsgrad", "groups_of_2_global_clipnorm_replicated_embedding"),
}


# The fused update (one XLA program per replica per bucket) is most of a
# case's cost: about a third of a process's time measured at N = 3. N = 1
# runs every case fused (the default); from N = 2 on the cases run the same
# arithmetic op by op (fused_update=False, a sharding argument: the Keras
# reference is unchanged) except these, which keep XLA on uneven, padded
# shards (N = 3) and under hybrid groups (N = 4), and at N = 2 also with
# both norm clippings, weight decay and loss scaling.
FUSED_FROM_3 = ("defaults", "defaults_model_fit", "amsgrad", "epsilon_zero_padded", "use_ema_overwrite",
                "groups_of_2_defaults_model_fit", "groups_of_2_clipnorm_amsgrad")
FUSED_AT_2 = FUSED_FROM_3 + ("clipnorm", "global_clipnorm", "weight_decay_with_exclusion",
                             "embedding_densified_loss_scale_weight_decay")


assert all(any(c["name"] == name for c in CASES) for name in FUSED_AT_2 + FOUR_WORKER_CASES)


def fused(case, replicas):
    if replicas == 1 or case["name"] in (FUSED_AT_2 if replicas == 2 else FUSED_FROM_3):
        return case
    return {**case, "kwargs": {**case.get("kwargs", {}), "fused_update": False}}


def portable(case):
    return {**case, "name": "portable_" + case["name"], "portable": True}


def cases_for(replicas):
    if replicas == 1:
        return [c for c in CASES if c["name"] in ONE_WORKER_CASES]
    selected = [fused(c, replicas) for c in CASES if (c not in HYBRID_CASES or replicas == HYBRID_REPLICAS)
                and (c["name"] not in ELEMENTWISE_CASES or replicas == ELEMENTWISE_REPLICAS)
                and (replicas != 4 or c in HYBRID_CASES or c["name"] in FOUR_WORKER_CASES)]
    return selected + [portable(c) for c in selected if c["name"] in PORTABLE_CASES.get(replicas, ())]


def group_size(case, replicas):
    """Workers one copy of the state is sharded over."""
    return case.get("kwargs", {}).get("shard_group_size") or replicas


def assert_clipping_mixed(case, row):
    """A clipping case must have clipped some updates and left others alone."""
    clipped, updates = row["clipped_updates"]
    assert updates == row["reference_iterations"]
    if any(k in case.get("kwargs", {}) for k in ("clipnorm", "clipvalue", "global_clipnorm")):
        assert 0 < clipped < updates, f"choose a threshold that clips some updates, not all: {row}"


def run_cases(n, cases):
    """One worker process training ``cases`` on N = n; its RESULT rows by case name."""
    proc = start_worker(["equivalence.py", n, json.dumps(cases)])
    try:
        out = finish(proc, timeout=1200)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, f"N={n} worker failed:\n{out[-6000:]}"
    rows = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    parsed = {row["case"]: row for row in rows}
    assert sorted(parsed) == sorted(c["name"] for c in cases), out[-3000:]
    return parsed


def pytest_generate_tests(metafunc):
    if metafunc.cls is not None and "case" in metafunc.fixturenames:
        cases = metafunc.cls.cases()
        metafunc.parametrize("case", cases, ids=[c["name"] for c in cases])


@pytest.fixture(scope="class")
def results(request):
    """The test class's worker run, once (a failure errors every test of the
    class). A module-level fixture: pytest 10 drops class-scoped fixtures
    defined as instance methods."""
    return run_cases(request.cls.replicas, request.cls.cases())


class Equivalence:
    """The tests of one worker process (a subclass per N)."""

    replicas: int

    @classmethod
    def cases(cls):
        return cases_for(cls.replicas)

    @pytest.mark.timeout(1500)
    def test_matches_single_device_adam(self, results, case):
        replicas = self.replicas
        row = results[case["name"]]
        # The run must actually have trained, or equality would prove nothing.
        assert row["reference_moved"] > 1e-2
        # `iterations` counts optimizer updates: micro-steps // accumulation steps.
        updates = STEPS // (case.get("kwargs", {}).get("gradient_accumulation_steps") or 1)
        assert row["iterations"] == row["reference_iterations"] == updates
        assert row["max_rel_diff"] <= TOLERANCE, row
        assert row["skipped_steps"] == 0, row
        assert row["fused_update"] is case.get("kwargs", {}).get("fused_update", True)
        if case["name"] == "epsilon_zero_padded":
            assert any(entry["padding"] for entry in row["layout"]), "the case needs padded shards"
        # Multi-replica CPU runs take the direct (all-to-all) collectives unless
        # the case (or DISTADAM_DIRECT_COLLECTIVES=0) asks for the portable ones.
        direct = replicas > 1 and direct_collectives_requested() and not case.get("portable")
        assert row["direct_collectives"] is direct
        assert_clipping_mixed(case, row)
        # The placements and exchanges the case is about actually happened: one
        # all-gather of rows per sparse bucket replaces its reduce-scatter, and a
        # replicated bucket is all-reduced and never gathered.
        placements = row["placements"]
        assert placements.count("replicated") == case.get("replicated_buckets", 0), placements
        expected_sparse = (0 if case.get("model") == "dense" or case.get("kwargs", {}).get("row_sparse") == []
                           else 1)
        assert len(row["sparse_buckets"]) == expected_sparse, row["sparse_buckets"]
        groups = group_size(case, replicas)
        assert row["group_ops"] == (None if groups == replicas else "none" if groups == 1
                                    else "direct" if direct else "emulated")
        if replicas > 1:
            sparse = row["sparse_buckets"]
            sharded = placements.count("sharded")
            replicated_sparse = sum(placements[b] == "replicated" for b in sparse)
            sharded_dense = sharded - (len(sparse) - replicated_sparse)
            norm = row["norm_statistics"]
            expected = {"reduce_scatter": sharded_dense,
                        "all_gather": sharded + len(sparse),
                        "all_reduce": placements.count("replicated") - replicated_sparse + norm}
            if row["group_ops"] == "direct":  # each shard is also all-reduced across groups
                expected["all_reduce"] += sharded_dense
            elif row["group_ops"] == "emulated":  # the group's collectives, emulated over all workers
                expected["all_reduce"] += sharded_dense + norm
                expected["all_gather"] += sharded
            elif row["group_ops"] == "none":  # groups of one: shards all-reduced, nothing gathered
                expected = {"reduce_scatter": sharded_dense,
                            "all_gather": len(sparse),
                            "all_reduce": placements.count("replicated") - replicated_sparse + sharded_dense + norm}
            # Launches are counted while tracing: once per replica and trace.
            traces = sum(row["launches"].values()) // sum(expected.values())
            assert traces >= 1 and row["launches"] == {k: v * traces for k, v in expected.items()}, \
                (row["launches"], expected, placements)

    @pytest.mark.timeout(1500)
    def test_state_is_sharded(self, results):
        """Per-replica state <= Adam's / N + padding, cross-checked against sizes."""
        replicas = self.replicas
        for case in self.cases():
            row = results[case["name"]]
            per_device = row["state_bytes_per_device"]
            assert len(per_device) == replicas
            shards = group_size(case, replicas)
            total_params = sum(row["param_counts"])
            kinds = row["reference_state_bytes"] // (4 * total_params)
            # Adam keeps m, v (+v_hat, +EMA, +accumulators) per parameter, mirrored.
            assert row["reference_state_bytes"] == kinds * 4 * total_params
            # Each sharded bucket costs ceil(elements / N) per state kind, a
            # replicated one all its elements.
            shard_sizes = {}
            for entry in row["layout"]:
                shard_sizes[entry["bucket"]] = entry["elements"][1] - entry["elements"][0] + entry["padding"]
            replicated = sum({e["bucket"]: shard_sizes[e["bucket"]]
                              for e in row["layout"] if e["placement"] == "replicated"}.values())
            buckets = len(shard_sizes)
            for nbytes in per_device.values():
                assert nbytes == kinds * 4 * sum(shard_sizes.values()), (case["name"], row["layout"])
                bound = (row["reference_state_bytes"] - kinds * 4 * replicated) / shards + kinds * 4 * replicated
                assert nbytes <= bound + kinds * 4 * buckets * (shards - 1), (case["name"], nbytes, bound)
            # Every element of every variable is owned by exactly one shard.
            owned = {}
            for entry in row["layout"]:
                for piece in entry["variables"]:
                    owned.setdefault(piece["name"], []).append(tuple(piece["range"]))
            for name, ranges in owned.items():
                ranges = sorted(set(ranges))  # a replicated bucket's one shard is listed once
                assert ranges[0][0] == 0
                assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (name, ranges)
            sizes = sorted(r[-1][1] for r in (sorted(v) for v in owned.values()))
            assert sizes == sorted(row["param_counts"])


class TestOneWorker(Equivalence):
    replicas = 1


class TestTwoWorkers(Equivalence):
    replicas = 2


@pytest.mark.slow
class TestThreeWorkers(Equivalence):
    replicas = 3


@pytest.mark.slow
class TestFourWorkers(Equivalence):
    """N = 4: its covering set and the hybrid groups."""
    replicas = HYBRID_REPLICAS


# Every N, and every case of each N exactly once.
assert sorted({cls.replicas for cls in Equivalence.__subclasses__()}) == list(REPLICAS)
for _n in REPLICAS:
    assert sorted(c["name"] for cls in Equivalence.__subclasses__() if cls.replicas == _n for c in cls.cases()) \
        == sorted(c["name"] for c in cases_for(_n))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_strategies_built_one_after_another_in_one_process(run_worker):
    """A notebook comparing optimizers (issue 25, item 4): Keras Adam, then
    ShardedAdam (global norm, hybrid groups of 1, EMA), then a mixed_bfloat16
    pair (Keras Adam after the ShardedAdam runs, then ShardedAdam), each
    under a new MirroredStrategy(2) in one process: each equals its
    one-device reference. (Measured at N=4 with groups of 2 too.) (TensorFlow gives every strategy
    instance the same collective keys; distadam's are its own per strategy.)
    Also keras.callbacks.SwapEMAWeights with ShardedAdam under MirroredStrategy."""
    out, code = run_worker(["two_strategies.py", "2"], timeout=540)
    assert code == 0, out[-4000:]
    result = json.loads(re.search(r"RESULT (.*)", out).group(1))
    assert result["clipping_changed_the_result"] > 1e-2, result  # the clipped runs prove clipping
    assert result["swap_ema_changed_the_result"] > 1e-2, result  # the EMA runs differ from plain Adam
    for name in ("keras", "sharded", "sharded_in_groups", "sharded_mixed_bfloat16",
                 "sharded_swap_ema_weights", "sharded_swap_ema_val_loss"):
        assert result[name] <= TOLERANCE, (name, result)
