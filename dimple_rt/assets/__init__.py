# SPDX-License-Identifier: Apache-2.0
"""Model files shipped inside the package (``dimple-tiny/``); a package so that setuptools ships it as such."""
