# SPDX-License-Identifier: Apache-2.0
"""DimpleTokenizer.apply_chat_template against transformers' apply_chat_template on the same template.

The template is Qwen2.5-VL-7B-Instruct's, which Dimple's checkpoint carries (spec §2). Both sides read it from the
tiny checkpoint's tokenizer_config.json, so any difference is in the rendering environment or the variables passed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
from _transformers_oracle import require_transformers

from dimple_rt.testing.tiny_tokenizer import QWEN2_5_VL_CHAT_TEMPLATE, write_tiny_tokenizer
from dimple_rt.tokenizer import DimpleTokenizer

transformers = require_transformers()

README_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
)

IMAGE = {"type": "image", "image": "file:///tmp/cat.png"}
TEXT = {"type": "text", "text": "Describe this image."}

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "string_content": [{"role": "user", "content": "What is 2 + 2?"}],
    "image_then_text": [{"role": "user", "content": [IMAGE, TEXT]}],
    "text_then_image": [{"role": "user", "content": [TEXT, IMAGE]}],
    "two_images": [
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "and"}, {"type": "image"}, TEXT]},
    ],
    "image_url_key": [{"role": "user", "content": [{"image_url": "http://x/y.png"}, TEXT]}],
    "system_present": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": [IMAGE, TEXT]},
    ],
    "system_list_content": [
        {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Bonjour?"},
    ],
    "multi_turn": [
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        {"role": "user", "content": "Thanks! <|mask|> ünïcödé 東京"},
    ],
    "none_values_dropped": [{"role": "user", "content": [IMAGE, TEXT], "name": None}],
    "non_json_object": [{"role": "user", "content": [{"type": "image", "image": object()}, TEXT]}],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_chat")
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def ours(tiny_dir: Path) -> DimpleTokenizer:
    return DimpleTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def oracle(tiny_dir: Path):
    return transformers.Qwen2Tokenizer.from_pretrained(tiny_dir)


def test_checkpoint_carries_qwen2_5_vl_template(ours: DimpleTokenizer, oracle) -> None:
    assert ours.chat_template == oracle.chat_template == QWEN2_5_VL_CHAT_TEMPLATE


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_matches_transformers(
    ours: DimpleTokenizer, oracle, name: str, add_generation_prompt: bool, add_vision_id: bool
) -> None:
    messages = CONVERSATIONS[name]
    kwargs = {"add_generation_prompt": add_generation_prompt, "add_vision_id": add_vision_id}
    want = oracle.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours.apply_chat_template(messages, **kwargs) == want
    want_ids = oracle.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    # transformers parses special-token strings in message text; that is our explicit raw-prompt opt-in.
    assert ours.apply_chat_template(messages, tokenize=True, parse_special_tokens=True, **kwargs) == want_ids
    # By default message text never becomes special tokens; without such text the ids are the same.
    safe = ours.apply_chat_template(messages, tokenize=True, **kwargs)
    if "<|mask|>" in str(messages):
        assert safe != want_ids and ours.mask_token_id not in safe
    else:
        assert safe == want_ids


def test_add_vision_id_numbers_pictures(ours: DimpleTokenizer) -> None:
    prompt = ours.apply_chat_template(CONVERSATIONS["two_images"], add_vision_id=True)
    assert "Picture 1: <|vision_start|><|image_pad|><|vision_end|>and" in prompt
    assert "Picture 2: <|vision_start|><|image_pad|><|vision_end|>Describe" in prompt


def test_readme_prompt(ours: DimpleTokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image", "image": "demo.jpg"}, TEXT]}]
    assert ours.apply_chat_template(messages) == README_PROMPT  # add_generation_prompt defaults to True


def test_readme_prompt_token_structure(ours: DimpleTokenizer) -> None:
    ids = ours.apply_chat_template([{"role": "user", "content": [IMAGE, TEXT]}], tokenize=True)
    im_start, im_end = ours.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    newline = ours.encode("\n")
    want = (
        [im_start, *ours.encode("system\nYou are a helpful assistant."), im_end, *newline]
        + [im_start, *ours.encode("user\n")]
        + [ours.vision_start_token_id, ours.image_pad_token_id, ours.vision_end_token_id]
        + [*ours.encode("Describe this image."), im_end, *newline]
        + [im_start, *ours.encode("assistant\n")]
    )
    assert ids == want
    assert len(newline) == 1  # one token, like id 198 in the real vocabulary
    assert ids.count(ours.image_pad_token_id) == 1  # the processor expands it later
    generation_prompt = [im_start, *ours.encode("assistant"), *newline]
    assert ids[-len(generation_prompt) :] == generation_prompt


def test_empty_conversation_is_rejected(ours: DimpleTokenizer) -> None:
    with pytest.raises(ValueError, match="empty"):
        ours.apply_chat_template([])


# Template sources and the rendering environment -----------------------------------------------------------------

# Exercises the parts of Hugging Face's environment the Qwen template does not: tojson without HTML escaping,
# loopcontrols, trim_blocks/lstrip_blocks, special-token variables, raise_exception.
CUSTOM_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'skip' %}{% continue %}{% endif %}
    {{ message['role'] }}: {{ message | tojson }}
    {% if message['role'] == 'stop' %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}{{ eos_token }}{{ extra | default('') }}{% endif %}
{% if fail %}{{ raise_exception('asked to fail') }}{% endif %}"""

CUSTOM_MESSAGES = [
    {"role": "user", "content": "<b>& 'quotes' \"double\" é 東"},
    {"role": "skip", "content": "hidden"},
    {"role": "stop", "content": [{"type": "text", "text": "x"}]},
    {"role": "user", "content": "after stop"},
]


def _with_template(src: Path, dst: Path, *, config_template: str | None, files: dict[str, str]) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template")
    if config_template is not None:
        config["chat_template"] = config_template
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in files.items():
        (dst / name).write_text(text, encoding="utf-8")
    return dst


def test_custom_template_matches_transformers(ours: DimpleTokenizer, oracle, tiny_dir: Path, tmp_path: Path) -> None:
    directory = _with_template(tiny_dir, tmp_path / "ckpt", config_template=None, files={})
    (directory / "chat_template.jinja").write_text(CUSTOM_TEMPLATE, encoding="utf-8")
    custom = DimpleTokenizer.from_pretrained(directory)
    assert custom.chat_template == CUSTOM_TEMPLATE
    for add_generation_prompt in (True, False):
        got = custom.apply_chat_template(CUSTOM_MESSAGES, add_generation_prompt=add_generation_prompt, extra="!")
        want = oracle.apply_chat_template(
            CUSTOM_MESSAGES,
            chat_template=CUSTOM_TEMPLATE,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            extra="!",
        )
        assert got == want
    with pytest.raises(jinja2.exceptions.TemplateError, match="asked to fail"):
        custom.apply_chat_template(CUSTOM_MESSAGES, fail=True)
    with pytest.raises(jinja2.exceptions.TemplateError, match="asked to fail"):
        oracle.apply_chat_template(CUSTOM_MESSAGES, chat_template=CUSTOM_TEMPLATE, tokenize=False, fail=True)


def test_kwargs_override_special_token_variables(ours: DimpleTokenizer, oracle, tiny_dir: Path, tmp_path: Path) -> None:
    directory = _with_template(tiny_dir, tmp_path / "ckpt", config_template=CUSTOM_TEMPLATE, files={})
    custom = DimpleTokenizer.from_pretrained(directory)
    got = custom.apply_chat_template(CUSTOM_MESSAGES[:1], bos_token="[BOS]")
    want = oracle.apply_chat_template(
        CUSTOM_MESSAGES[:1],
        chat_template=CUSTOM_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
        bos_token="[BOS]",
    )
    assert got == want and got.startswith("[BOS]")


def test_template_sources(tiny_dir: Path, tmp_path: Path) -> None:
    from_json = _with_template(
        tiny_dir,
        tmp_path / "json",
        config_template=None,
        files={"chat_template.json": json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE})},
    )
    assert DimpleTokenizer.from_pretrained(from_json).chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    # chat_template.jinja wins over tokenizer_config.json, as in transformers.
    jinja_wins = _with_template(
        tiny_dir, tmp_path / "jinja", config_template="config", files={"chat_template.jinja": "file"}
    )
    assert DimpleTokenizer.from_pretrained(jinja_wins).chat_template == "file"
    named = _with_template(
        tiny_dir,
        tmp_path / "named",
        config_template=None,
        files={},
    )
    config = json.loads((named / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    (named / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert DimpleTokenizer.from_pretrained(named).chat_template == "d"
