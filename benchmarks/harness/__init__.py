"""Shared pieces of the benchmark workers, one module a concern:

    models       the benchmark models and their summary
    accounting   optimizer state bytes per device, read from the variables
    collectives  collectives in a traced step and the bytes they send
                 (distadam.cost_model's ring table)
    timing       interleaved A/B timing and its statistics
    profiler     self time per op type from a tf.profiler trace (private TF, one seam)
    steps        process set-up, batches, training and exchange-only steps
    tasks        the task skeleton the MirroredStrategy and Horovod workers share

Nothing here runs on import: a worker calls ``steps.quiet_tensorflow()``
itself, before TensorFlow loads.
"""
