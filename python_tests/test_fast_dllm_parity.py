# SPDX-License-Identifier: Apache-2.0
"""Optional: the 'fast_dllm' pipeline against the public NVlabs/Fast-dLLM code itself (issue 16).

On a tiny random Dream-architecture model that the test writes, in fp32 and greedy, ``cache="block"`` and
``cache="dual"`` must give the same tokens and the same number of forwards as Fast-dLLM's Dream
``diffusion_generate`` (``dream/model/generation_utils_block.py``, ``alg="confidence_threshold"``) with
``dual_cache`` False and True. Their code runs from a checkout outside this repository, in an interpreter that
has the transformers version it needs (4.46):

    DIMPLE_RT_FASTDLLM=/path/to/Fast-dLLM DIMPLE_RT_FASTDLLM_PYTHON=/path/to/venv/bin/python pytest ...

Without both variables the test is skipped: nothing of Fast-dLLM is part of dimple_rt.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import dimple_rt
from dimple_rt.testing.tiny_checkpoint import TinySizes, write_tiny_checkpoint

REPO = os.environ.get("DIMPLE_RT_FASTDLLM")
PYTHON = os.environ.get("DIMPLE_RT_FASTDLLM_PYTHON")
pytestmark = pytest.mark.skipif(
    not (REPO and PYTHON and (Path(REPO) / "dream" / "model" / "generation_utils_block.py").is_file()),
    reason="Fast-dLLM is not available: set DIMPLE_RT_FASTDLLM (a checkout) and DIMPLE_RT_FASTDLLM_PYTHON "
    "(a python with transformers 4.46)",
)

# Runs in Fast-dLLM's interpreter: builds their DreamModel from our config.json and weights, patches in the
# block generation mixin exactly as their eval.py does, counts forwards, prints tokens and the count as JSON.
THEIR_SIDE = r"""
import json, sys, types
import torch
from safetensors.torch import load_file

repo, checkpoint, request = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, repo + "/dream")
from model.configuration_dream import DreamConfig
from model.generation_utils_block import DreamGenerationMixin
from model.modeling_dream import DreamModel

ours = json.load(open(checkpoint + "/config.json"))
keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "mask_token_id",
        "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")
config = DreamConfig(**{k: ours[k] for k in keys}, hidden_act="silu", rope_scaling=None)
config._attn_implementation = "sdpa"
model = DreamModel(config).eval()
missing, unexpected = model.load_state_dict(load_file(checkpoint + "/model.safetensors"), strict=False)
assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
model.diffusion_generate = types.MethodType(DreamGenerationMixin.diffusion_generate, model)
model._sample = types.MethodType(DreamGenerationMixin._sample, model)
calls = [0]
forward = model.forward
def counted(*args, **kwargs):
    calls[0] += 1
    return forward(*args, **kwargs)
model.forward = counted
ids = torch.tensor([request["input_ids"]])
with torch.no_grad():
    out = model.diffusion_generate(
        ids, max_new_tokens=request["max_new_tokens"], steps=request["max_new_tokens"], temperature=0.0,
        alg="confidence_threshold", threshold=request["threshold"], block_length=request["block_length"],
        top_k=request["top_k"],
        dual_cache=request["dual_cache"], mask_token_id=ours["mask_token_id"], output_history=False,
        return_dict_in_generate=True,
    )
print(json.dumps({"tokens": out.sequences[0, ids.shape[1]:].tolist(), "forwards": calls[0]}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sizes = TinySizes(num_hidden_layers=2)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("dream"), vision=False, seed=5, sizes=sizes)


def _theirs(checkpoint: Path, input_ids: list[int], **request: object) -> dict:
    payload = json.dumps({"input_ids": input_ids, **request})
    done = subprocess.run(
        [PYTHON, "-c", THEIR_SIDE, REPO, str(checkpoint), payload], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# top_k 50 is what Fast-dLLM's Dream runs with unless told otherwise: its generation config is built from the
# model config, which carries transformers' default top_k=50, so its confidences come from the top-50 softmax.
@pytest.mark.parametrize("cache", ["block", "dual"])
@pytest.mark.parametrize("top_k", [50, None])
@pytest.mark.parametrize(("max_new_tokens", "block_length", "threshold"), [(16, 4, 0.9), (16, 8, 0.02), (12, 12, 0.05)])
def test_tokens_and_forwards_equal_fast_dllm(
    checkpoint: Path, cache: str, top_k: int | None, max_new_tokens: int, block_length: int, threshold: float
) -> None:
    rt = dimple_rt.Runtime(checkpoint, backend="reference")
    input_ids = [rt.config.bos_token_id or 1, 17, 42, 99, 7, 64]
    ids = torch.tensor([input_ids])
    ours = rt.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, pipeline="fast_dllm",
        block_length=block_length, threshold=threshold, cache=cache, top_k=top_k,
    )  # fmt: skip
    theirs = _theirs(
        checkpoint, input_ids, max_new_tokens=max_new_tokens, block_length=block_length, threshold=threshold,
        dual_cache=cache == "dual", top_k=top_k,
    )  # fmt: skip
    assert ours[0].sequences[0, ids.shape[1] :].tolist() == theirs["tokens"]
    assert ours[0].num_forward_passes == theirs["forwards"]
