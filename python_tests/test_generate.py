# SPDX-License-Identifier: Apache-2.0
"""Runtime.generate: the step loop against a plain transcription of the authors' ``_sample`` (spec §4.3–4.6),
prefilling, batching, structure priors, hooks, results and bad input, on tiny random checkpoints.

The oracle below re-derives every step from a full-sequence ``Runtime.forward`` (which, like the authors' code,
reruns the vision tower and recomputes positions each step), shifts the logits, and applies the spec's per-alg
rules with torch's global RNG, so ``torch.manual_seed(s)`` + oracle is the authors' code run after the same seed.
Token choice itself is ``sample_tokens``, checked against the spec in test_sampling.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dimple_rt
from dimple_rt.generation.priors import parse_template
from dimple_rt.generation.sampling import sample_tokens
from dimple_rt.testing.tiny_checkpoint import TinySizes, write_tiny_checkpoint

TEXT_BATCH = ["Hi", "What colour is the big circle in the picture?"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> dimple_rt.Runtime:
    return dimple_rt.Runtime(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), backend="reference")


@pytest.fixture(scope="module")
def one_layer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny1"), sizes=TinySizes(num_hidden_layers=1), seed=3)


def _image(width: int = 84, height: int = 56):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).ellipse((5, 5, 40, 40), fill=(200, 20, 20))
    return image


def _conversation(text: str, image: bool = True) -> list[dict]:
    content: list[dict] = [{"type": "image", "image": _image()}] if image else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def sharpen(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A logits hook that makes the random model confident, so that the threshold path is exercised."""
    return logits * 60.0


def authors_loop(rt: dimple_rt.Runtime, inputs, max_new: int, *, steps=None, eps=1e-3, alg="origin", threshold=None,
                 temperature=0.0, top_p=None, top_k=None, alg_temp=None, use_original_confidence=True,
                 pipeline="dim", logits_hook=None) -> tuple[torch.Tensor, int]:  # fmt: skip
    """The authors' no-cache ``_sample`` loop, batch-coupled, on the global RNG: (sequences, forward passes)."""
    steps = steps or max_new
    mask_id = rt.config.mask_token_id
    ids = torch.cat([inputs.input_ids, torch.full((inputs.input_ids.shape[0], max_new), mask_id)], dim=1)
    attn = torch.cat([inputs.attention_mask, torch.ones(inputs.input_ids.shape[0], max_new, dtype=torch.long)], 1)
    ts = torch.linspace(1, eps, steps + 1)
    num_total_mask = (ids == mask_id).sum()
    kind = {"topk_margin": {"margin_confidence": True}, "entropy": {"neg_entropy": True}}.get(alg, {})
    passes = 0
    for i in range(steps):
        x = ids.clone()
        mask_index = x == mask_id
        logits = rt.forward(x, attn, inputs.pixel_values, inputs.image_grid_thw)
        passes += 1
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if logits_hook is not None:
            logits = logits_hook(i, x, logits)
        mask_logits = logits[mask_index]
        fill = torch.full_like(x[mask_index], mask_id)

        def topn(confidence: torch.Tensor, n: int) -> torch.Tensor:
            if alg_temp:
                return torch.multinomial(torch.softmax(confidence / alg_temp, dim=-1), num_samples=n)
            return torch.sort(confidence, descending=True, stable=True).indices[:n]  # CUDA topk: ties lowest

        if pipeline == "dream":
            t, s = ts[i], ts[i + 1]
            if alg in ("origin", "autoregressive"):
                if alg == "origin":
                    p = 1 - s / t if i < steps - 1 else 1
                    chosen = torch.rand(*fill.shape) < p
                else:
                    first = torch.zeros_like(x, dtype=torch.bool)
                    first[torch.arange(x.shape[0]), mask_index.max(dim=1)[1]] = True
                    chosen = first[mask_index]
                _, fill[chosen] = sample_tokens(
                    mask_logits[chosen], temperature, top_p, top_k, use_original_confidence=False
                )
            else:
                confidence, x0 = sample_tokens(
                    mask_logits, temperature, top_p, top_k, use_original_confidence=False, **kind
                )
                n = int(mask_index.sum() * (1 - s / t)) if i < steps - 1 else int(mask_index.sum())
                if n > 0:
                    index = topn(confidence, n)
                    fill[index] = x0[index]
        else:
            confidence, x0 = sample_tokens(mask_logits, temperature, top_p, top_k,
                                           use_original_confidence=use_original_confidence, **kind)  # fmt: skip
            passed = 0
            if threshold:
                chosen = torch.ones_like(confidence, dtype=torch.bool) if i == steps - 1 else confidence > threshold
                passed = int(chosen.sum())
                fill[chosen] = x0[chosen]
            if passed == 0:
                n_cur = mask_index.sum()
                ratio = n_cur / num_total_mask
                start = max(int((ts < ratio).nonzero()[0, 0]), i + 1)
                for k in range(start, steps + 1):
                    s = ts[k]
                    n = int(n_cur * (1 - s / ratio)) if s > ts[-1] else int(n_cur)
                    if n >= 1:
                        break
                if alg == "origin":
                    index = torch.randperm(fill.shape[0])[:n]
                elif alg == "origin-ratio":
                    p = 1 - s / ratio if s > ts[-1] else 1
                    index = torch.rand(*fill.shape) < p
                elif alg == "autoregressive":
                    first = torch.zeros_like(x, dtype=torch.bool)
                    first[torch.arange(x.shape[0]), mask_index.max(dim=1)[1]] = True
                    index = first[mask_index]
                else:
                    index = topn(confidence, n)
                fill[index] = x0[index]
        x[mask_index] = fill
        ids = x
        if pipeline == "dim" and not bool((ids == mask_id).any()):
            break
    return ids, passes


ORACLE_CASES = {
    "origin-seeded": {"alg": "origin"},
    "origin-threshold": {"alg": "origin", "threshold": 0.95, "logits_hook": sharpen},
    "origin-sampled": {"alg": "origin", "temperature": 0.7, "top_p": 0.9, "threshold": 0.95, "logits_hook": sharpen},
    "origin-ratio": {"alg": "origin-ratio", "steps": 6},
    "autoregressive": {"alg": "autoregressive", "steps": 20},
    "maskgit-plus": {"alg": "maskgit_plus", "steps": 5},
    "maskgit-plus-alg-temp": {"alg": "maskgit_plus", "alg_temp": 0.5, "steps": 7},
    "topk-margin-top-k": {"alg": "topk_margin", "top_k": 5, "temperature": 0.5, "use_original_confidence": False},
    "entropy-threshold": {"alg": "entropy", "threshold": 0.5, "steps": 4},
    "dream-maskgit": {"pipeline": "dream", "alg": "maskgit_plus", "top_p": 0.01, "steps": 8},
    "dream-origin": {"pipeline": "dream", "alg": "origin", "temperature": 0.5},
    "dream-entropy": {"pipeline": "dream", "alg": "entropy", "steps": 6},
    "dream-autoregressive": {"pipeline": "dream", "alg": "autoregressive", "steps": 6},
}


@pytest.mark.parametrize("case", list(ORACLE_CASES.values()), ids=list(ORACLE_CASES))
def test_matches_the_authors_loop_batch_coupled(rt: dimple_rt.Runtime, case: dict) -> None:
    """Same sequences and forward passes as the authors' loop, on a left-padded batch with an image."""
    inputs = rt.prepare([_conversation(TEXT_BATCH[0]), _conversation(TEXT_BATCH[1], image=False)])
    options = {"threshold": None, **case}
    torch.manual_seed(1234)
    expected, passes = authors_loop(rt, inputs, MAX_NEW, **options)
    hook = options.pop("logits_hook", None)
    if options.get("pipeline") == "dream":
        options.setdefault("threshold", None)
    torch.manual_seed(1234)  # seed=None: our draws come from the global RNG, exactly like the authors'
    results = rt.generate(
        inputs, max_new_tokens=MAX_NEW, prefill=False, batch_coupled=True, logits_hook=hook, **options
    )
    got = torch.cat([r.sequences for r in results])
    assert torch.equal(got, expected)
    assert results[0].num_forward_passes == passes
    # A private seeded stream gives the same draws as the global one after manual_seed.
    seeded = rt.generate(
        inputs, max_new_tokens=MAX_NEW, prefill=False, batch_coupled=True, logits_hook=hook, seed=1234, **options
    )
    assert torch.equal(torch.cat([r.sequences for r in seeded]), expected)


def test_prefill_is_exact_for_a_one_layer_model(one_layer_dir: Path) -> None:
    """With one layer the prompt K/V depend only on the prompt, so the cached prefix is exact: prefilled
    decoding must then equal full decoding token for token (positions, masks and the crop all matter)."""
    rt = dimple_rt.Runtime(one_layer_dir)
    inputs = rt.prepare([_conversation(TEXT_BATCH[0]), _conversation(TEXT_BATCH[1])])
    for options in ({"alg": "maskgit_plus"}, {"alg": "origin", "seed": 5, "threshold": None}):
        full = rt.generate(inputs, max_new_tokens=MAX_NEW, prefill=False, **options)
        cached = rt.generate(inputs, max_new_tokens=MAX_NEW, prefill=True, **options)
        assert [r.token_ids for r in cached] == [r.token_ids for r in full]


def test_prefill_shapes_and_step_zero(rt: dimple_rt.Runtime) -> None:
    """Step 0 is the full sequence in both modes (same logits); later prefilled steps see the last prompt token
    plus the canvas; with two layers prefilling is an approximation, so later steps may differ."""
    inputs = rt.prepare([_conversation("Hi")])
    prompt_len = inputs.input_ids.shape[1]
    seen: dict[bool, list[tuple[tuple[int, ...], torch.Tensor]]] = {True: [], False: []}
    for prefill in (True, False):

        def hook(step, x, logits, prefill=prefill):
            seen[prefill].append((tuple(x.shape), logits.clone()))
            return logits

        rt.generate(inputs, max_new_tokens=MAX_NEW, steps=4, prefill=prefill, logits_hook=hook, threshold=None)
    assert [shape for shape, _ in seen[False]] == [(1, prompt_len + MAX_NEW)] * 4
    assert [shape for shape, _ in seen[True]] == [(1, prompt_len + MAX_NEW)] + [(1, MAX_NEW + 1)] * 3
    torch.testing.assert_close(seen[True][0][1], seen[False][0][1], rtol=0, atol=0)


def test_image_features_computed_once_per_request(rt: dimple_rt.Runtime, monkeypatch) -> None:
    calls = []
    original = rt.model.visual.forward
    monkeypatch.setattr(rt.model.visual, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    for prefill in (False, True):
        calls.clear()
        result = rt.generate(_conversation("Hi"), max_new_tokens=6, steps=64, prefill=prefill, threshold=None)
        assert result.num_forward_passes == 6 and len(calls) == 1


def test_per_sequence_mode_is_independent_of_the_batch(rt: dimple_rt.Runtime) -> None:
    conversations = [_conversation(TEXT_BATCH[0]), _conversation(TEXT_BATCH[1], image=False)]
    for options in ({"alg": "maskgit_plus"}, {"alg": "origin", "temperature": 0.8, "seed": 7, "threshold": None}):
        batch = rt.generate(conversations, max_new_tokens=MAX_NEW, **options)
        alone = [rt.generate(conv, max_new_tokens=MAX_NEW, **options) for conv in conversations]
        assert [r.token_ids for r in batch] == [r.token_ids for r in alone]


def test_masked_rows_only_equal_the_full_lm_head(rt: dimple_rt.Runtime) -> None:
    """A no-op hook forces the full LM head; without hooks only masked rows run it. Same tokens either way."""
    inputs = rt.prepare([_conversation(TEXT_BATCH[0]), _conversation(TEXT_BATCH[1])])
    for prefill in (False, True):
        fast = rt.generate(inputs, max_new_tokens=MAX_NEW, prefill=prefill)
        full = rt.generate(inputs, max_new_tokens=MAX_NEW, prefill=prefill, logits_hook=lambda i, x, lg: lg)
        assert [r.sequences.tolist() for r in fast] == [r.sequences.tolist() for r in full]


@pytest.fixture(scope="module")
def kernels(rt: dimple_rt.Runtime) -> dimple_rt.Runtime:
    return dimple_rt.Runtime(rt.path, backend="kernels")


GREEDY_CASES = {
    "maskgit-threshold": {"alg": "maskgit_plus", "logits_hook": sharpen},
    "topk-margin": {"alg": "topk_margin", "threshold": None, "steps": 5},
    "entropy": {"alg": "entropy", "threshold": None},
    "origin-seeded": {"alg": "origin", "threshold": None, "seed": 3},
    "origin-ratio": {"alg": "origin-ratio", "threshold": None, "seed": 3, "steps": 6},
    "autoregressive": {"alg": "autoregressive", "threshold": None, "steps": 20},
    "alg-temp": {"alg": "maskgit_plus", "alg_temp": 0.5, "threshold": None, "seed": 1},
    "top-k": {"alg": "maskgit_plus", "top_k": 3, "use_original_confidence": False},
    "dream-maskgit": {"pipeline": "dream", "alg": "maskgit_plus", "top_p": 0.01, "steps": 8},
    "dream-origin": {"pipeline": "dream", "alg": "origin", "seed": 2},
}


@pytest.mark.parametrize("coupled", [False, True], ids=["per-sequence", "coupled"])
@pytest.mark.parametrize("prefill", [False, True], ids=["full", "prefill"])
@pytest.mark.parametrize("case", list(GREEDY_CASES.values()), ids=list(GREEDY_CASES))
def test_kernels_and_reference_backends_agree(
    rt: dimple_rt.Runtime, kernels: dimple_rt.Runtime, case: dict, prefill: bool, coupled: bool
) -> None:
    """Greedy decoding of an fp32 model: the fused kernels (attention, cache write, confident_select) and the
    plain-torch reference make the same decisions, token for token and step for step."""
    options = {"max_new_tokens": MAX_NEW, "prefill": prefill, "batch_coupled": coupled, **case}
    conversations = [_conversation(TEXT_BATCH[0]), _conversation(TEXT_BATCH[1], image=False)]
    ours = kernels.generate(conversations, **options)
    ref = rt.generate(conversations, **options)
    assert [r.sequences.tolist() for r in ours] == [r.sequences.tolist() for r in ref]
    assert ours[0].num_forward_passes == ref[0].num_forward_passes


def test_kernels_sampling_is_seeded_and_batch_independent(kernels: dimple_rt.Runtime) -> None:
    conversations = [_conversation(TEXT_BATCH[0]), _conversation(TEXT_BATCH[1], image=False)]
    options = {"max_new_tokens": MAX_NEW, "temperature": 0.9, "top_p": 0.9, "seed": 11}
    first = kernels.generate(conversations, **options)
    again = kernels.generate(conversations, **options)
    alone = [kernels.generate(conv, **options) for conv in conversations]
    other_seed = kernels.generate(conversations, **{**options, "seed": 12})
    tokens = [r.token_ids for r in first]
    assert tokens == [r.token_ids for r in again] == [r.token_ids for r in alone]
    assert tokens != [r.token_ids for r in other_seed]


def test_dream_schedule_counts(rt: dimple_rt.Runtime) -> None:
    """Spec §4.9: 'dream' + maskgit_plus with N = 8, steps = 8 commits [0, 1, 1, 1, 1, 1, 1, 2]."""
    steps = list(rt.stream("Hi", max_new_tokens=8, steps=8, pipeline="dream", alg="maskgit_plus", top_p=0.01))
    assert [s.committed for s in steps] == [0, 1, 1, 1, 1, 1, 1, 2]


def test_dim_fallback_commits_one_token_per_step_and_stops_early(rt: dimple_rt.Runtime) -> None:
    steps = list(rt.stream("Hi", max_new_tokens=8, steps=64, alg="maskgit_plus", threshold=None))
    assert [s.committed for s in steps] == [1] * 8  # at least one per step, early stop once nothing is masked
    confident = list(rt.stream("Hi", max_new_tokens=8, logits_hook=sharpen))
    assert len(confident) < 8 and sum(s.committed for s in confident) == 8


def test_result_fields_history_and_stream(rt: dimple_rt.Runtime) -> None:
    # steps > max_new_tokens: the fallback commits exactly one token per step, so there are MAX_NEW steps.
    options = {"max_new_tokens": MAX_NEW, "steps": 64, "threshold": None}
    result = rt.generate(_conversation("Hi"), return_history=True, **options)
    prompt_len = result.sequences.shape[1] - MAX_NEW
    assert len(result.history) == result.num_forward_passes == MAX_NEW
    assert torch.equal(result.history[-1], result.sequences)
    assert result.token_ids == rt.tokenizer.answer_ids(result.sequences[0, prompt_len:])
    assert result.text == rt.tokenizer.decode(result.token_ids)
    streamed = list(rt.stream(_conversation("Hi"), **options))
    assert torch.equal(streamed[-1].canvas, result.sequences[:, prompt_len:])
    masks_left = [int((s.canvas == rt.config.mask_token_id).sum()) for s in streamed]
    assert masks_left == list(range(MAX_NEW - 1, -1, -1))
    assert rt.render_canvas(streamed[0].canvas[0]).count("␣") == MAX_NEW - 1


def test_text_is_cut_at_the_first_terminator(rt: dimple_rt.Runtime) -> None:
    im_end = rt.tokenizer.eos_token_id
    word = rt.tokenizer.encode(" blue")

    def force(step, x, logits):
        if step is None:
            x[:, -MAX_NEW:] = torch.tensor(word + [im_end] + word * (MAX_NEW - len(word) - 1))[:MAX_NEW]
        return x

    result = rt.generate("Hi", max_new_tokens=MAX_NEW, tokens_hook=force)
    assert result.token_ids == word and result.text == " blue" and result.num_forward_passes == 1


def test_pretokenised_inputs_equal_conversations(rt: dimple_rt.Runtime) -> None:
    conversations = [_conversation(TEXT_BATCH[0]), _conversation(TEXT_BATCH[1])]
    inputs = rt.prepare(conversations)
    by_conversation = rt.generate(conversations, max_new_tokens=MAX_NEW)
    by_keywords = rt.generate(max_new_tokens=MAX_NEW, **vars(inputs))
    by_dict = rt.generate(dict(vars(inputs)), max_new_tokens=MAX_NEW)
    expected = [r.token_ids for r in by_conversation]
    assert [r.token_ids for r in by_keywords] == expected == [r.token_ids for r in by_dict]


def test_template_tokens_are_fixed_and_count_as_decoded(rt: dimple_rt.Runtime) -> None:
    template = "Answer: <mask:3>. Reason: <mask:4>"
    layout = torch.tensor(parse_template(template, rt.tokenizer.encode, rt.config.mask_token_id))
    fixed = layout != rt.config.mask_token_id
    assert int((~fixed).sum()) == 7 and bool(fixed.any())
    result = rt.generate("Hi", template=template, threshold=None, return_history=True)
    assert result.sequences.shape[1] - len(layout) == rt.prepare("Hi").input_ids.shape[1]  # canvas = template
    for snapshot in result.history:
        assert torch.equal(snapshot[0, -len(layout) :][fixed], layout[fixed])
    assert result.num_forward_passes == 7  # one token per step: only the 7 masks count (num_total_mask)
    assert rt.tokenizer.decode(result.sequences[0, -len(layout) :]).startswith("Answer: ")


def test_response_length_forces_the_answer_length(rt: dimple_rt.Runtime) -> None:
    result = rt.generate("Hi", max_new_tokens=MAX_NEW, response_length=5, threshold=None)
    canvas = result.sequences[0, -MAX_NEW:]
    assert canvas[5:].tolist() == [rt.config.pad_token_id] * (MAX_NEW - 5)
    assert len(result.token_ids) <= 5 and result.num_forward_passes == 5


def test_logits_hook_bans_a_token(rt: dimple_rt.Runtime) -> None:
    free = rt.generate("Hi", max_new_tokens=MAX_NEW, threshold=None)
    banned = max(set(free.token_ids), key=free.token_ids.count)

    def ban(step, x, logits):
        logits[..., banned] = float("-inf")
        return logits

    result = rt.generate("Hi", max_new_tokens=MAX_NEW, threshold=None, logits_hook=ban)
    assert banned not in result.sequences[0, -MAX_NEW:].tolist()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"alg": "greedy"}, ValueError, "alg must be one of"),
        ({"pipeline": "llada"}, ValueError, "pipeline must be one of"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"alg_temp": -0.5}, ValueError, "alg_temp"),
        ({"max_new_tokens": 200_000}, ValueError, r"max_new_tokens must be an integer in \[1, 8192\]"),
        ({"max_new_tokens": 8000}, ValueError, "max_position_embeddings"),
        ({"steps": 0}, ValueError, "steps"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"pipeline": "dream", "threshold": 0.9}, ValueError, "no threshold"),
        ({"pipeline": "dream", "alg": "origin-ratio"}, ValueError, "origin-ratio"),
        ({"thresold": 0.9}, TypeError, "thresold"),
        ({"template": "Answer: <mask:x>"}, ValueError, "malformed mask span"),
        ({"template": "<mask:4>", "max_new_tokens": 3}, ValueError, "more than max_new_tokens"),
        ({"response_length": 20, "max_new_tokens": 8}, ValueError, "response_length"),
    ],
)
def test_bad_options_raise(rt: dimple_rt.Runtime, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        rt.generate("Hi", **kwargs)


def test_bad_inputs_raise(rt: dimple_rt.Runtime) -> None:
    inputs = rt.prepare(["Hi", "a longer prompt"])
    with pytest.raises(ValueError, match="left padding"):
        rt.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask.flip(1))
    with pytest.raises(ValueError, match="attention_mask"):
        rt.generate(input_ids=inputs.input_ids)
    ids = inputs.input_ids.clone()
    ids[0, -2] = rt.config.mask_token_id
    with pytest.raises(ValueError, match="<|mask|>"):
        rt.generate(input_ids=ids, attention_mask=inputs.attention_mask)
    with pytest.raises(ValueError, match="changed prompt tokens"):
        rt.generate("Hi", tokens_hook=lambda step, x, logits: torch.zeros_like(x))
    with_image = rt.prepare(_conversation("Hi"))
    with pytest.raises(ValueError, match="image"):  # pixels for one image, no placeholders in the ids
        rt.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                    pixel_values=with_image.pixel_values, image_grid_thw=with_image.image_grid_thw)  # fmt: skip
    with pytest.raises(ValueError, match="either inputs or"):
        rt.generate("Hi", input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)


@pytest.mark.parametrize("prefill", [False, True], ids=["full", "prefill"])
def test_generated_image_pad_tokens_are_plain_tokens(rt: dimple_rt.Runtime, prefill: bool) -> None:
    """Image features go to the prompt's placeholders only: an <|image_pad|> the model writes into the canvas
    (here forced by a hook) is an ordinary token at the next step, not a slot that breaks the scatter."""
    image_id = rt.config.image_token_id

    def favour_image_pad(step, x, logits):
        logits[..., image_id] += 1e3
        return logits

    result = rt.generate(_conversation("Hi"), max_new_tokens=6, steps=64, prefill=prefill, threshold=None,
                         logits_hook=favour_image_pad)  # fmt: skip
    assert result.sequences[0, -6:].tolist() == [image_id] * 6 and result.num_forward_passes == 6
