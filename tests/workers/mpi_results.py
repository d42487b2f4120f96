"""How launcher-run workers hand results to the tests.

mpirun (and horovodrun --mpi) relays each rank's stdout in chunks, each with
its own "[job,rank]<stdout>:" tag, so one long printed line can arrive cut
into pieces. Results therefore go to a file per rank in $RESULT_DIR (set by
the test), one JSON object per line; the printed copy is for humans.
"""

import json
import os


def emit(row, rank):
    line = json.dumps(row)
    print("RESULT " + line, flush=True)
    directory = os.environ.get("RESULT_DIR")
    if directory:
        with open(os.path.join(directory, f"rank{rank}.jsonl"), "a") as f:
            f.write(line + "\n")
