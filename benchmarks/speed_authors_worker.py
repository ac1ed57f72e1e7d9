# SPDX-License-Identifier: Apache-2.0
"""Worker for speed_modes.py: runs the authors' ``diffusion_generate`` (yu-rp/Dimple ``training-code/models``)
in *their* Python (transformers 4.46.2, accelerate 1.6.0), one thread, fp32. Nothing of theirs is imported by
dimple_rt; this file only runs under DIMPLE_RT_AUTHORS_PYTHON.

    python speed_authors_worker.py AUTHORS_CHECKOUT CHECKPOINT INPUTS.pt

Protocol: prints "ready" once loaded; then each line "run" on stdin runs one answer and prints
``{"seconds": s, "forwards": n, "tokens": [...]}``; "quit" ends.

Glue (all here): their models folder is linked into a temporary package (their modeling file imports
``.configuration_Dimple`` while the file is ``configuration_dimple.py``, so a second link gives that name);
inputs (ids, pixel values, grid) come from dimple_rt's processor, so their tokenizer/processor are not used.
Forwards are counted by wrapping the model's ``forward``.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    torch.set_num_threads(1)
    checkout, checkpoint, inputs_path = map(Path, sys.argv[1:4])
    models = checkout / "training-code" / "models"
    pkg_root = Path(tempfile.mkdtemp(prefix="dimple_authors_"))
    pkg = pkg_root / "dimple_authors"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for f in models.glob("*.py"):
        (pkg / f.name).symlink_to(f)
    if not (pkg / "configuration_Dimple.py").exists():
        (pkg / "configuration_Dimple.py").symlink_to(models / "configuration_dimple.py")
    sys.path.insert(0, str(pkg_root))
    from dimple_authors.modeling_dimple import DimpleModel

    inputs = torch.load(inputs_path)
    gen_config = checkpoint / "generation_config.json"
    if not gen_config.exists():  # their from_pretrained requires one; dimple_rt's tiny checkpoint has none
        ids = {k: inputs[k] for k in ("mask_token_id", "pad_token_id", "eos_token_id")}
        gen_config.write_text(json.dumps({**ids, "bos_token_id": inputs["pad_token_id"]}))
    model = DimpleModel.from_pretrained(str(checkpoint), torch_dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    count = [0]
    inner = model.forward

    def counted(*args, **kwargs):
        count[0] += 1
        return inner(*args, **kwargs)

    model.forward = counted
    kwargs = {
        "attention_mask": inputs["attention_mask"],
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
        "max_new_tokens": inputs["max_new_tokens"],
        "steps": inputs["max_new_tokens"],
        "temperature": 0.0,
        "alg": "maskgit_plus",
        "alg_p_threshold": 0.95,
        "use_original_confidence": True,
        "decoding_pipeline": "dim",
        "use_cache": True,
        "output_history": False,
        "return_dict_in_generate": True,
        "mask_token_id": inputs["mask_token_id"],
        "pad_token_id": inputs["pad_token_id"],
        "eos_token_id": inputs["eos_token_id"],
    }
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        count[0] = 0
        with torch.no_grad():
            start = time.perf_counter()
            out = model.diffusion_generate(inputs["input_ids"], **kwargs)
            seconds = time.perf_counter() - start
        seq = out.sequences if hasattr(out, "sequences") else out
        tokens = seq[0, inputs["input_ids"].shape[1] :].tolist()
        print(json.dumps({"seconds": seconds, "forwards": count[0], "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
