#!/usr/bin/env python
"""msad launcher: `python launch.py SWEEP.yaml` or `python launch.py COMMAND ...` (see --help)."""

from msad.cli import entry_point

if __name__ == "__main__":
    entry_point()
