# SPDX-License-Identifier: Apache-2.0
"""``python -m dimple_rt.training CONFIG`` (also under torchrun): the same as ``dimple-rt train CONFIG``."""

from __future__ import annotations

import sys

from dimple_rt.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
