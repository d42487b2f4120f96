"""Each rank emits (mpi_results) the TF_CONFIG that the mpi4py rendezvous
built for it and whether MPI was finalised afterwards (it must be: see
distadam/mpi_rendezvous.py).

usage: mpirun -np N python mpi_rendezvous_check.py
"""

import importlib.util
import sys
from pathlib import Path

# Loaded by path, not through the distadam package: the rendezvous needs no
# TensorFlow, and three TensorFlow imports on two cores would dominate.
_path = Path(__file__).resolve().parents[2] / "distadam" / "mpi_rendezvous.py"
_spec = importlib.util.spec_from_file_location("mpi_rendezvous", _path)
mpi_rendezvous = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mpi_rendezvous)

tf_config = mpi_rendezvous.rendezvous_tf_config()
assert "tensorflow" not in sys.modules, "the rendezvous must not import TensorFlow"

from mpi4py import MPI  # noqa: E402  (already imported by the rendezvous)

from mpi_results import emit  # noqa: E402

rank = tf_config["task"]["index"]
emit({"rank": rank, "tf_config": tf_config, "mpi_finalized": bool(MPI.Is_finalized())}, rank)
