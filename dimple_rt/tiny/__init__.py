# SPDX-License-Identifier: Apache-2.0
"""dimple-tiny: a small Dimple trained by our own pipeline on a synthetic task suite, shipped as the default model.

``tasks`` generates the data (and scores answers), ``tokenizer`` trains its BPE tokenizer, ``build`` regenerates
data, tokenizer, training runs and the shipped copy with one command. The shipped weights live in
``dimple_rt/assets/dimple-tiny`` and load with ``dimple_rt.Runtime("dimple-tiny")``.
"""
