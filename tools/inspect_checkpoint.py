#!/usr/bin/env python
"""Print what a checkpoint step holds (step, layout, config summary, files and sizes) and verify every
checksum of its manifest. Exit code 1 when the step is incomplete or corrupt (the file is named).

usage: tools/inspect_checkpoint.py PATH   (a step directory, a checkpoints folder or a run folder)
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_megatron.training.inspect import describe_step  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="step directory, checkpoints folder or run folder (follows 'latest')")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    args = parser.parse_args()
    description, error = describe_step(args.path)
    if args.json:
        print(json.dumps(dict(description, error=error), indent=1))
    else:
        for key, value in description.items():
            print(f"{key}: {value}")
        print(f"verified: {'NO - ' + error if error else 'yes, every file matches the manifest'}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
