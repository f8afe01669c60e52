"""An example script run under torchrun for tests/test_streaming.py: `streaming_worker.py RECORD_DIR SCRIPT ARGS...`
runs `SCRIPT.main()` (run_mlm, run_clm or run_pretraining) with ARGS and writes, per process, the batch each
training step gave it (input_ids and labels), and the gloo threads still alive after run_cli, to
RECORD_DIR/rank<N>.json."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import gloo_threads, script_module  # noqa: E402

from ipu_trainer import IPUTrainer  # noqa: E402
from ipu_trainer.cli.startup import run_cli  # noqa: E402


def main() -> int:
    record_dir, script, *argv = sys.argv[1:]
    steps = []
    original_step = IPUTrainer.training_step

    def recording_step(self, model, inputs, num_items_in_batch=None):
        steps.append({key: inputs[key].tolist() for key in ("input_ids", "labels") if key in inputs})
        return original_step(self, model, inputs, num_items_in_batch)

    IPUTrainer.training_step = recording_step
    sys.argv = [f"{script}.py", *argv]
    code = run_cli(script_module(script).main)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"code": code, "steps": steps, "gloo_threads_after_run_cli": gloo_threads()}, handle)
    return code


if __name__ == "__main__":
    sys.exit(main())
