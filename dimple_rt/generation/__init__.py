# SPDX-License-Identifier: Apache-2.0
"""Generation: per-step token sampling (``sampling``) and commit schedules (``schedule``) as pure tensor functions."""
