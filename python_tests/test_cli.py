# SPDX-License-Identifier: Apache-2.0
"""``dimple-rt generate``'s flags: every GenerationConfig option has one and reaches the config unchanged;
bad values exit 2 with the option named and no traceback; ``--json`` prints one parseable object; ``--version``;
``--visualize`` writes its file."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

import dimple_rt
import dimple_rt.presets
from dimple_rt import __version__, cli
from dimple_rt.config import GenerationConfig

# A value for every field, in a combination GenerationConfig accepts ('fast_dllm' takes
# the block options), and, for the other pipeline, the options only 'dim' takes; as (flag arguments, value).
FAST = {
    "max_new_tokens": (["--max-new-tokens", "48"], 48),
    "steps": (["--steps", "20"], 20),
    "eps": (["--eps", "0.01"], 0.01),
    "temperature": (["--temperature", "0.7"], 0.7),
    "top_p": (["--top-p", "0.9"], 0.9),
    "top_k": (["--top-k", "50"], 50),
    "alg": (["--alg", "topk_margin"], "topk_margin"),
    "alg_temp": (["--alg-temp", "0"], 0.0),
    "threshold": (["--threshold", "0.8"], 0.8),
    "use_original_confidence": (["--no-use-original-confidence"], False),
    "pipeline": (["--pipeline", "fast_dllm"], "fast_dllm"),
    "prefill": (["--prefill"], True),
    "cache": (["--cache", "dual"], "dual"),
    "block_length": (["--block-length", "8"], 8),
    "block_start": (["--block-start", "threshold"], "threshold"),
    "refresh_every": (["--refresh-every", "3"], 3),
    "refresh_prompt": (["--no-refresh-prompt"], False),
    "early_stop": (["--early-stop"], True),
    "seed": (["--seed", str(2**64 - 1)], 2**64 - 1),
    "batch_coupled": (["--no-batch-coupled"], False),
    "validate_categorical": (["--no-validate-categorical"], False),
    "return_history": (["--return-history"], True),
}
DIM = {
    "alg": (["--alg", "origin-ratio"], "origin-ratio"),
    "alg_temp": (["--alg-temp", "0.4"], 0.4),
    "threshold": (["--threshold", "none"], None),
    "pipeline": (["--pipeline", "dim"], "dim"),
    "prefill": (["--no-prefill"], False),
    "cache": (["--cache", "prefix"], "prefix"),
    "block_length": (["--block-length", "none"], None),
    "block_start": (["--block-start", "first"], "first"),
    "refresh_every": (["--refresh-every", "none"], None),
    "refresh_prompt": (["--refresh-prompt"], True),
    "early_stop": (["--no-early-stop"], False),
    "batch_coupled": (["--batch-coupled"], True),
}


def _options(*argv: str) -> dict:
    return cli.generation_options(cli.build_parser().parse_args(["generate", "some-model", *argv]))


def test_every_generation_config_field_has_a_flag_that_reaches_the_config() -> None:
    fields = {field.name for field in dataclasses.fields(GenerationConfig)}
    assert set(FAST) == fields, "a new GenerationConfig field: add a value for it here"
    for table in (FAST, {**FAST, **DIM}):
        argv = [arg for flags, _ in table.values() for arg in flags]
        expected = {name: value for name, (_, value) in table.items()}
        options = _options(*argv)
        assert options == expected
        assert GenerationConfig(**options) == GenerationConfig(**expected)
    # Each flag on its own, too: nothing else is passed, so the library's defaults apply to the rest.
    for name, (flags, value) in {**FAST, **DIM}.items():
        expected = {name: value} if name == "max_new_tokens" else {"max_new_tokens": 32, name: value}
        assert _options(*flags) == expected


def test_flags_are_typed_from_the_annotations() -> None:
    hints = typing.get_type_hints(GenerationConfig)
    generate = cli.build_parser().parse_args(["generate", "some-model"]).options_parser
    flags = {action.dest: action for action in generate._actions}
    for name, hint in hints.items():
        action = flags[name]
        if hint is bool:
            assert isinstance(action, cli.argparse.BooleanOptionalAction)
        elif type(None) in typing.get_args(hint):
            assert action.type("none") is None and action.type("NONE") is None
    assert _options("--threshold", "auto")["threshold"] == "auto"
    assert _options("--template", "Answer: <mask:4>.", "--response-length", "3") == {
        "template": "Answer: <mask:4>.",
        "response_length": 3,
    }


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--top-k", "many"], "--top-k"),
        (["--max-new-tokens", "1.5"], "--max-new-tokens"),
        (["--alg", "beam"], "--alg"),
        (["--pipeline", "ar"], "--pipeline"),
        (["--eps", "1.5"], "--eps"),
        (["--threshold", "2"], "--threshold"),
        (["--threshold", "high"], "--threshold"),
        (["--temperature", "1e-9"], "--temperature"),
        (["--seed", "-1"], "--seed"),
        (["--steps", "0"], "--steps"),
        (["--cache", "dual"], "--cache"),
        (["--block-start", "last"], "--block-start"),
        (["--visualize", "out.png"], "--visualize"),
    ],
)
def test_bad_options_exit_2_naming_the_option(argv: list[str], named: str, capsys: pytest.CaptureFixture) -> None:
    """Checked before a model is loaded (the model does not even exist here), argparse-style."""
    with pytest.raises(SystemExit) as done:
        cli.main(["generate", "no-such-model", *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("dimple-rt generate: error: argument ") and named in last
    assert "Traceback" not in err


def test_an_error_after_parsing_is_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["generate", "dimple-tiny", "--response-length", "-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dimple-rt: error: response_length") and "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"dimple-rt {__version__}"


def test_json_is_one_object_with_the_answer_stats_and_options(capsys: pytest.CaptureFixture) -> None:
    argv = ["generate", "dimple-tiny", "--prompt", "What is 2 plus 3?", "--max-new-tokens", "8", "--json"]
    assert cli.main([*argv, "--threshold", "none", "--return-history"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    data = json.loads(out)
    expected = dimple_rt.Runtime("dimple-tiny").generate("What is 2 plus 3?", max_new_tokens=8, threshold=None)
    assert data["text"] == expected.text and data["token_ids"] == expected.token_ids
    assert data["finish_reason"] == expected.finish_reason
    assert data["num_forward_passes"] == expected.num_forward_passes == len(data["history"])
    assert set(data["stats"]) == {field.name for field in dataclasses.fields(expected.stats)}
    assert data["stats"]["forward_passes"] == expected.stats.forward_passes
    assert data["options"] == dataclasses.asdict(
        GenerationConfig(max_new_tokens=8, threshold=None, return_history=True)
    )


def test_visualize_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    gif = tmp_path / "steps.gif"
    argv = ["generate", "dimple-tiny", "--prompt", "What is 2 plus 3?", "--max-new-tokens", "6", "--threshold", "none"]
    assert cli.main([*argv, "--visualize", str(gif)]) == 0
    out = capsys.readouterr().out
    passes = int(out.split("forward passes: ")[1].split()[0])
    with Image.open(gif) as image:
        assert image.n_frames == passes
    assert f"visualisation: {gif}" in out and "stats: " in out


def test_preset_is_the_base_the_flags_override(capsys: pytest.CaptureFixture) -> None:
    argv = ["generate", "dimple-tiny", "--prompt", "What is 2 plus 3?", "--max-new-tokens", "16", "--preset", "fast"]
    assert cli.main([*argv, "--block-length", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    fast = dimple_rt.Runtime("dimple-tiny", preset="fast")
    expected = fast.generate("What is 2 plus 3?", max_new_tokens=16, block_length=4)
    assert data["token_ids"] == expected.token_ids and data["num_forward_passes"] == expected.num_forward_passes
    config = GenerationConfig(**{**dimple_rt.presets.FAST.options, "max_new_tokens": 16, "block_length": 4})
    assert data["options"] == dataclasses.asdict(config)
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--cache", "prefix"])  # the preset's refresh_prompt=False needs a block cache
    assert done.value.code == 2 and "argument --cache: " in capsys.readouterr().err
