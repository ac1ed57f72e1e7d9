# SPDX-License-Identifier: Apache-2.0
"""Training samples (spec §6.2), bad-record handling and the collator (spec §6.3), on the tiny checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dimple_rt.config import DimpleConfig
from dimple_rt.model.rope import get_rope_index
from dimple_rt.processor import ImageProcessor, expand_image_placeholders
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint
from dimple_rt.tokenizer import DimpleTokenizer
from dimple_rt.training.data import (
    IGNORE_INDEX,
    BadRecordError,
    ConversationDataset,
    GlobalOrder,
    SampleBuilder,
    collate,
    dynamic_padding_upper,
    padded_answer_length,
    read_records,
)
from dimple_rt.training.synthetic import draw_shape

# An 84x56 picture stays 84x56 (within [min, max] pixels, sides multiples of 28): grid (1, 4, 6), 6 tokens.
IMAGE_SIZE = (84, 56)
IMAGE_TOKENS = 6
QUESTION = "<image>\nWhat colour is the shape?"
ANSWER = "The circle is red."
FOLLOW_UP, SECOND_ANSWER = "Is it big?", "Yes."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> DimpleTokenizer:
    return DimpleTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def processor(checkpoint: Path) -> ImageProcessor:
    return ImageProcessor.from_pretrained(checkpoint)


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _conversation(tmp_path: Path) -> Path:
    draw_shape("red", "circle", IMAGE_SIZE).save(tmp_path / "pic.png")
    record = {
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": FOLLOW_UP},
            {"role": "assistant", "content": SECOND_ANSWER},
        ],
        "images": ["pic.png"],
    }
    return _write_jsonl(tmp_path / "train.jsonl", [record])


def test_dynamic_padding_upper_bound() -> None:
    # The authors' exp_dynamic_padding, spec §6.2's examples.
    assert [dynamic_padding_upper(n) for n in (0, 1, 2, 3, 4, 5, 7, 8, 15)] == [1, 2, 4, 4, 8, 8, 8, 16, 16]
    assert [dynamic_padding_upper(n) for n in (16, 17, 31, 32, 100)] == [32, 32, 32, 48, 112]


def test_sample_of_a_fixed_conversation(tmp_path: Path, tokenizer: DimpleTokenizer, processor: ImageProcessor) -> None:
    (record,), bad = read_records(_conversation(tmp_path))
    assert bad == []
    builder = SampleBuilder(tokenizer, processor, seed=0)
    rng = random.Random(123)
    sample = builder.build(record, rng)

    # The same draws, made by hand: one randint per answer, in order.
    reference_rng = random.Random(123)
    answer, second = tokenizer.encode(ANSWER), tokenizer.encode(SECOND_ANSWER)
    pads = [reference_rng.randint(len(a) + 1, dynamic_padding_upper(len(a))) - len(a) for a in (answer, second)]
    pad = tokenizer.pad_token_id
    image = "<|vision_start|>" + "<|image_pad|>" * IMAGE_TOKENS + "<|vision_end|>"
    prompt1 = tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>") + tokenizer.encode(
        f"\n<|im_start|>user\n{image}\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt2 = tokenizer.encode(f"\n<|im_start|>user\n{FOLLOW_UP}<|im_end|>\n<|im_start|>assistant\n")
    answer1, answer2 = answer + [pad] * pads[0], second + [pad] * pads[1]
    assert sample.input_ids == prompt1 + answer1 + prompt2 + answer2
    assert sample.labels == [IGNORE_INDEX] * len(prompt1) + answer1 + [IGNORE_INDEX] * len(prompt2) + answer2
    assert sample.mask_locations == [False] * len(prompt1) + [True] * len(answer1) + [False] * len(prompt2) + [
        True
    ] * len(answer2)
    # The first prompt is token for token the chat template's (spec §6.2), image placeholders expanded.
    content = [{"type": "image"}, {"type": "text", "text": "\nWhat colour is the shape?"}]
    template = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert tokenizer.encode(expand_image_placeholders([template], sample.image_grid_thw)[0]) == prompt1
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sample.input_ids.count(tokenizer.image_pad_token_id) == IMAGE_TOKENS
    assert sample.image_grid_thw.tolist() == [[1, 4, 6]]
    assert sample.pixel_values.shape == (24, 1176)
    # No <|im_end|> after an assistant turn (the authors' training format).
    assert im_end not in answer1 + answer2


def test_dynamic_pad_lengths_cover_their_range(tmp_path: Path, tokenizer: DimpleTokenizer) -> None:
    answer = "A green triangle sits on top of a yellow rectangle."  # n ≥ 8: upper is 16 or a multiple of 16
    _write_jsonl(
        tmp_path / "t.jsonl",
        [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": answer}]}],
    )
    dataset = ConversationDataset(tmp_path / "t.jsonl", SampleBuilder(tokenizer, None, seed=7))
    n = len(tokenizer.encode(answer))
    upper = dynamic_padding_upper(n)
    lengths = set()
    for epoch in range(300):
        sample = dataset.sample(epoch, 0)
        answer_len = sum(sample.mask_locations)
        assert n + 1 <= answer_len <= upper
        assert sample.input_ids[-(answer_len - n) :] == [tokenizer.pad_token_id] * (answer_len - n)
        lengths.add(answer_len)
    assert lengths == set(range(n + 1, upper + 1))  # uniform over the whole inclusive range
    # A pure function of (seed, epoch, index): rebuilding gives the same sample, another seed another stream.
    assert dataset.sample(5, 0).input_ids == dataset.sample(5, 0).input_ids
    other = ConversationDataset(tmp_path / "t.jsonl", SampleBuilder(tokenizer, None, seed=8))
    assert [len(other.sample(e, 0).input_ids) for e in range(20)] != [
        len(dataset.sample(e, 0).input_ids) for e in range(20)
    ]


def test_fixed_padding_pads_or_truncates(tmp_path: Path, tokenizer: DimpleTokenizer) -> None:
    (record,), _ = read_records(
        _write_jsonl(
            tmp_path / "t.jsonl",
            [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ANSWER}]}],
        )
    )
    ids = tokenizer.encode(ANSWER)
    for length in (3, len(ids), len(ids) + 5):
        sample = SampleBuilder(tokenizer, None, answer_padding="fixed", answer_length=length).build(
            record, random.Random(0)
        )
        expected = (ids + [tokenizer.pad_token_id] * length)[:length]
        assert sample.input_ids[-length:] == expected and sum(sample.mask_locations) == length


def test_uniform_padding_reaches_answer_length_for_short_answers() -> None:
    rng = random.Random(3)
    # A 2-token answer: dynamic stops at 4 tokens, uniform goes up to answer_length, covering every length.
    assert {padded_answer_length(2, "uniform", rng, 40) for _ in range(2000)} == set(range(3, 41))
    # An answer whose dynamic bound is already beyond answer_length keeps the dynamic range.
    assert {padded_answer_length(40, "uniform", rng, 20) for _ in range(500)} == set(range(41, 49))
    with pytest.raises(ValueError, match="dynamic, uniform, fixed; got 'random'"):
        padded_answer_length(2, "random", rng, 40)


def test_bad_records_are_reported_with_file_and_line(
    tmp_path: Path, tokenizer: DimpleTokenizer, processor: ImageProcessor
) -> None:
    draw_shape("blue", "square", IMAGE_SIZE).save(tmp_path / "ok.png")
    good = {
        "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
        "images": ["ok.png"],
    }
    lines = [
        good,
        {
            "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
            "images": ["nope.png"],
        },
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "images": ["ok.png"]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]},
        "{not json",
        "",
        {"messages": [{"role": "user", "content": "Q " * 200}, {"role": "assistant", "content": "A"}]},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    records, bad = read_records(path, on_bad_record="skip")
    assert [r.source for r in records] == [f"{path}:1", f"{path}:8"]
    reasons = {err.source: err.reason for err in bad}
    assert set(reasons) == {f"{path}:{n}" for n in (2, 3, 4, 5, 6)}
    assert "image file not found" in reasons[f"{path}:2"] and "nope.png" in reasons[f"{path}:2"]
    assert "0 <image> placeholders but 1 images" in reasons[f"{path}:3"]
    assert "role 'system'" in reasons[f"{path}:4"]
    assert "empty assistant answer" in reasons[f"{path}:5"]
    assert "not valid JSON" in reasons[f"{path}:6"]
    with pytest.raises(BadRecordError, match=rf"^{path}:2: image file not found"):
        read_records(path, on_bad_record="error")

    # Too long is found when the sample is built; it is never sliced.
    builder = SampleBuilder(tokenizer, processor, max_seq_length=64)
    assert len(builder.build(records[0], random.Random(0)).input_ids) <= 64
    with pytest.raises(BadRecordError, match=rf"^{path}:8: sample has \d+ tokens, more than max_seq_length=64"):
        builder.build(records[1], random.Random(0))

    # A file that exists but is no image passes the read-time checks and is reported when built.
    (tmp_path / "broken.png").write_text("not a picture")
    broken = {
        "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A"}],
        "images": ["broken.png"],
    }
    (record,), _ = read_records(_write_jsonl(tmp_path / "broken.jsonl", [broken]))
    with pytest.raises(BadRecordError, match=rf"^{tmp_path / 'broken.jsonl'}:1: cannot read image .*broken.png"):
        builder.build(record, random.Random(0))


def test_global_order_is_a_permutation_per_epoch() -> None:
    order = GlobalOrder(5, seed=3)
    first = [order[p] for p in range(10)]
    assert sorted(i for e, i in first[:5] if e == 0) == list(range(5))
    assert [e for e, _ in first] == [0] * 5 + [1] * 5
    assert sorted(i for _, i in first[5:]) == list(range(5))
    assert [GlobalOrder(5, seed=3)[p] for p in range(10)] == first
    assert [GlobalOrder(5, seed=3, shuffle=False)[p][1] for p in range(5)] == list(range(5))


def test_collator_right_pads_and_positions(
    tmp_path: Path, tokenizer: DimpleTokenizer, processor: ImageProcessor, checkpoint: Path
) -> None:
    config = DimpleConfig.from_json_file(checkpoint / "config.json")
    draw_shape("red", "circle", IMAGE_SIZE).save(tmp_path / "a.png")
    draw_shape("blue", "square", (56, 112)).save(tmp_path / "b.png")
    path = _write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "<image>Hi"},
                    {"role": "assistant", "content": "A long answer here."},
                ],
                "images": ["a.png"],
            },
            {"messages": [{"role": "user", "content": "Text only"}, {"role": "assistant", "content": "Ok"}]},
            {
                "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "B"}],
                "images": ["b.png"],
            },
        ],
    )
    dataset = ConversationDataset(path, SampleBuilder(tokenizer, processor))
    samples = [dataset.sample(0, i) for i in range(3)]
    batch = collate(samples, tokenizer.pad_token_id, config)
    length = max(len(s.input_ids) for s in samples)
    assert batch.input_ids.shape == (3, length)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        assert batch.input_ids[row, :n].tolist() == sample.input_ids
        assert (batch.input_ids[row, n:] == tokenizer.pad_token_id).all()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (length - n)
        assert batch.labels[row].tolist() == sample.labels + [IGNORE_INDEX] * (length - n)
        assert batch.mask_locations[row].tolist() == sample.mask_locations + [False] * (length - n)
        assert (batch.position_ids[:, row, n:] == 1).all()  # padded slots get position 1, as the reference
    assert batch.mask_locations.dtype == torch.bool
    assert batch.image_grid_thw.tolist() == [[1, 4, 6], [1, 8, 4]]
    torch.testing.assert_close(batch.pixel_values, torch.cat([samples[0].pixel_values, samples[2].pixel_values]))
    positions, deltas = get_rope_index(batch.input_ids, config, batch.image_grid_thw, batch.attention_mask)
    assert torch.equal(batch.position_ids, positions) and torch.equal(batch.rope_deltas, deltas)
    assert batch.num_samples == 3 and batch.num_tokens == sum(len(s.input_ids) for s in samples)
