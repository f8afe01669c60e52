"""Compare runs: `python -m ipu_trainer.plot OUTPUT_DIR [OUTPUT_DIR ...] [--output FILE]`.

Reads each run's `trainer_state.json` (the finished run's, else its newest checkpoint's), draws their curves in
one figure, each run labelled by its folder's name, and writes it to --output: by default `training_curves.png`
in the current folder, whatever the number of runs, so that a run's own picture is never replaced unasked.
A folder without a trainer state is one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .training.curves import CURVES_NAME, draw_curves, read_log_history, save_figure, trainer_state_of


def run_labels(folders: list[str]) -> list[str]:
    """Each folder's name; the paths as given where two names are the same (`a/out` and `b/out`)."""
    names = [os.path.basename(os.path.normpath(os.path.abspath(folder))) for folder in folders]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(folder) for folder in folders]


def main(argv: Optional[list[str]] = None) -> int:
    """The command; its exit code: 0 with the picture written, 2 with one `error:` line on bad input."""
    parser = argparse.ArgumentParser(prog="python -m ipu_trainer.plot", description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="a run's --output_dir")
    parser.add_argument("--output", default=CURVES_NAME,
                        help=f"the picture to write (default: {CURVES_NAME} in the current folder); its extension "
                             "picks the format (png, pdf, svg, ...)")
    args = parser.parse_args(argv)
    try:
        runs = {label: read_log_history(trainer_state_of(folder))
                for label, folder in zip(run_labels(args.output_dirs), args.output_dirs)}
        figure = draw_curves(runs)
        if figure is None:
            raise ValueError(f"nothing to draw: no loss, accuracy, learning rate or throughput in "
                             f"{', '.join(args.output_dirs)}")
        try:
            save_figure(figure, args.output)
        except OSError as error:
            raise ValueError(f"cannot write {args.output}: {error.strerror or error}") from None
        except ValueError as error:  # a format matplotlib does not write
            raise ValueError(f"--output {args.output}: {error}") from None
    except (OSError, ValueError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, whatever the message holds
        return 2
    print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) > 1 else ''}: {', '.join(runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
