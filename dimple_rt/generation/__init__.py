# SPDX-License-Identifier: Apache-2.0
"""Generation: the denoising step loop (``loop``), the step engine that batches many decodes step by step
(``engine``), and what one step decides (``decide``), built from token choice and confidence (``sampling``),
commit schedules (``schedule``) and structure priors (``priors``)."""
