"""ShardedAdam's constructor contract, checked up front.

Keras' Adam checks some arguments itself; these checks add what PyTorch's Adam
rejects and Keras accepts silently (a negative learning rate, betas outside
[0, 1), negative epsilon, weight decay or clip values, a non-bool ``amsgrad``,
``ema_overwrite_frequency=0``), and the sharding-specific arguments. Every
error names the argument.
"""

from __future__ import annotations

import numbers

import numpy as np


def require_real(name, value, *, low=None, high=None, high_open=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}: {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {name}={value!r}")
    if low is not None and value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {name}={value!r}")
    if high is not None and (value >= high if high_open else value > high):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"`{name}` must be {bound}, got {name}={value!r}")


def require_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}: {value!r}")


def require_positive_int(name, value, *, allow_none=False, minimum=1):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {expected}, got {name}={value!r}")


def is_real_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_adam_arguments(
    *, learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay, clipnorm, clipvalue,
    global_clipnorm, ema_momentum, ema_overwrite_frequency, loss_scale_factor,
    gradient_accumulation_steps,
):
    """The arguments ``keras.optimizers.Adam`` takes."""
    if is_real_number(learning_rate):  # else a schedule or a callable
        require_real("learning_rate", learning_rate, low=0.0)
        if not np.isfinite(np.float32(learning_rate)):  # Keras keeps it in a float32 variable
            raise ValueError(f"`learning_rate` overflows float32, got learning_rate={learning_rate!r}")
    require_real("beta_1", beta_1, low=0.0, high=1.0, high_open=True)
    require_real("beta_2", beta_2, low=0.0, high=1.0, high_open=True)
    require_real("epsilon", epsilon, low=0.0)
    require_bool("amsgrad", amsgrad)
    require_real("weight_decay", weight_decay, low=0.0, allow_none=True)
    for name, value in (("clipnorm", clipnorm), ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm)):
        require_real(name, value, low=0.0, allow_none=True)
    require_real("ema_momentum", ema_momentum, low=0.0, high=1.0)
    require_positive_int("ema_overwrite_frequency", ema_overwrite_frequency, allow_none=True)
    require_real("loss_scale_factor", loss_scale_factor, allow_none=True)
    if loss_scale_factor is not None and loss_scale_factor <= 0:
        raise ValueError(f"`loss_scale_factor` must be > 0, got loss_scale_factor={loss_scale_factor!r}")
    if gradient_accumulation_steps is not None and (
        isinstance(gradient_accumulation_steps, bool)
        or not isinstance(gradient_accumulation_steps, numbers.Integral)
    ):
        # Keras itself rejects integers < 2 with its own message.
        raise TypeError(
            "`gradient_accumulation_steps` must be an integer >= 2 or None, got "
            f"{gradient_accumulation_steps!r}"
        )


def check_sharding_arguments(*, backend, bucket_elements, shard_alignment, skip_nonfinite, replicate,
                             row_sparse, min_shard_elements, fused_update, max_consecutive_skips,
                             shard_group_size=None):
    """The arguments ShardedAdam adds to Adam's."""
    require_bool("skip_nonfinite", skip_nonfinite)
    require_positive_int("max_consecutive_skips", max_consecutive_skips, allow_none=True)
    require_bool("fused_update", fused_update)
    for name, patterns in (("replicate", replicate), ("row_sparse", row_sparse)):
        if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in _iterable(patterns, name)):
            raise TypeError(
                f"`{name}` must be a list of non-empty variable-name patterns (e.g. ['embeddings']), "
                f"got {patterns!r}"
            )
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a string, got {backend!r}")
    _require_count_or_auto("bucket_elements", bucket_elements, "buckets sized from the number of workers")
    require_positive_int("shard_alignment", shard_alignment)
    require_positive_int("min_shard_elements", min_shard_elements, minimum=0)
    # Whether it divides the number of workers is checked when the workers are known (build).
    _require_count_or_auto("shard_group_size", shard_group_size, "the workers of one node")


def _require_count_or_auto(name, value, auto_means):
    """A positive integer, None or the string "auto" (which means ``auto_means``)."""
    if isinstance(value, str) and value == "auto":
        return
    try:
        require_positive_int(name, value, allow_none=True)
    except ValueError as error:
        raise ValueError(f"{error} (or \"auto\": {auto_means})") from None


def name_matches(variable, patterns) -> bool:
    """Whether a pattern of ``replicate``/``row_sparse`` matches
    ``variable``'s path, as ``exclude_from_weight_decay``'s ``var_names`` do."""
    name = str(getattr(variable, "path", None) or variable.name)
    return any(pattern in name for pattern in patterns)


def _iterable(value, name):
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a list, got {value!r}") from None


# ------------------------------------------------ the constructor, declared once
#: Arguments keras.optimizers.Optimizer takes, checks, stores and serializes.
BASE_ARGUMENTS = ("learning_rate", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
                  "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps")


def _optional_int(value):
    return None if value is None else int(value)


def _int_none_or_auto(value):
    return value if value in (None, "auto") else int(value)


def _same(value):
    return value


#: Arguments ShardedAdam stores itself (and serializes in get_config), each
#: with how it is stored: Adam's own, then the sharding ones.
OWN_ARGUMENTS = {
    "beta_1": _same, "beta_2": _same, "epsilon": _same, "amsgrad": bool,
    "backend": _same, "bucket_elements": _int_none_or_auto, "shard_alignment": int, "skip_nonfinite": bool,
    "max_consecutive_skips": _optional_int, "replicate": tuple, "row_sparse": tuple,
    "min_shard_elements": int, "shard_group_size": _int_none_or_auto, "fused_update": bool,
}
_ADAM_CHECKED = ("learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad", "weight_decay", "clipnorm",
                 "clipvalue", "global_clipnorm", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
                 "gradient_accumulation_steps")
_SHARDING_CHECKED = ("backend", "bucket_elements", "shard_alignment", "skip_nonfinite", "replicate", "row_sparse",
                     "min_shard_elements", "fused_update", "max_consecutive_skips", "shard_group_size")


def split_constructor_arguments(given: dict) -> tuple:
    """Check the constructor's arguments (``given``: name -> value, every
    name of its signature) and split them: (what goes to
    ``keras.optimizers.Optimizer.__init__``, the attributes ShardedAdam sets)."""
    check_adam_arguments(**{name: given[name] for name in _ADAM_CHECKED})
    check_sharding_arguments(**{name: given[name] for name in _SHARDING_CHECKED})
    base = {name: given[name] for name in BASE_ARGUMENTS}
    if is_real_number(base["learning_rate"]):
        base["learning_rate"] = float(base["learning_rate"])
    own = {name: store(given[name]) for name, store in OWN_ARGUMENTS.items()}
    return base, own


def own_config(optimizer) -> dict:
    """The attributes of :data:`OWN_ARGUMENTS` as ``get_config`` returns them
    (JSON-friendly: tuples as lists)."""
    values = {name: getattr(optimizer, name) for name in OWN_ARGUMENTS}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}
