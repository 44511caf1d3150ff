"""Text from checkpoints, plugins and the command line reaches the terminal as text: no markup, no control codes."""

from __future__ import annotations

import json

import pytest
from conftest import build, main_in_process
from rich.console import Console
from safetensors.torch import load_file, save_file

from nanods import checkpoint, cli, registry
from nanods.safetensors_header import read_header
from nanods.terminal import escape, printable
from nanods.tokenizer import byte_tokenizer

# a rich closing tag with nothing to close (MarkupError), a hyperlink, and clear-screen + retitle-window
HOSTILE = ["[/]", "[link=https://example.invalid]x[/link]", "\x1b[2J\x1b]0;pwned\x07"]


@pytest.fixture
def wide(monkeypatch):
    """Consoles wide enough that no table cell or line wraps (the assertions look for whole strings)."""
    monkeypatch.setattr(cli, "out", Console(width=1000))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=1000))


def _checkpoint_with(tmp_path, **attention):
    """A real checkpoint whose nanods.components entry for attention has these fields replaced."""
    model = build(vocab_size=320)  # the byte tokenizer's 257 ids must fit the embedding
    path = checkpoint.save(tmp_path / "run", model, model.config, byte_tokenizer(), 1, {}, {}, {})
    _, metadata = read_header(path)
    components = json.loads(metadata["nanods.components"])
    components["attention"].update(attention)
    save_file(load_file(path), path, metadata={**metadata, "nanods.components": json.dumps(components)})
    return str(path)


def _assert_shown_as_text(text, output):
    assert "\x1b" not in output and "\x07" not in output
    assert printable(text) in output, output


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_printable_keeps_text_and_shows_controls():
    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable("\x1b[2J\x07\r\x9b\u202e") == "\\x1b[2J\\x07\\r\\x9b\\u202e"
    assert escape("[/] \x1b") == "\\[/] \\x1b"


@pytest.mark.parametrize("text", HOSTILE)
def test_inspect_shows_component_metadata_as_text(text, tmp_path, wide, capsys):
    path = _checkpoint_with(tmp_path, name=text, version=text)  # neither is needed to load the config
    code, out, err = main_in_process(["inspect", path], capsys)
    assert code == 0, err
    _assert_shown_as_text(text, out + err)
    assert f"attention {printable(text)} (nanods {printable(text)})" in out


@pytest.mark.parametrize("text", HOSTILE)
def test_an_error_quoting_checkpoint_metadata_is_one_line_of_text(text, tmp_path, wide, capsys):
    path = _checkpoint_with(tmp_path, dist=text)  # a package other than the one offering mla here: an error
    code, out, err = main_in_process(["inspect", path], capsys)
    assert code == 1
    assert len(_lines(err)) == 1, err
    _assert_shown_as_text(text, err)


@pytest.mark.parametrize("text", HOSTILE)
def test_components_shows_plugin_metadata_as_text(text, monkeypatch, wide, capsys):
    row = {"group": "attention", "name": text, "package": text, "version": text, "target": text,
           "imports": False, "error": text}
    monkeypatch.setattr(registry, "as_rows", lambda check_import=False: [row])
    code, out, err = main_in_process(["components", "--check"], capsys)
    assert code == 0, err
    _assert_shown_as_text(text, out + err)
    assert out.count(printable(text)) == 5, out  # name, package, version, the import error, target


def test_an_unknown_component_name_is_one_line_of_text(tmp_path, monkeypatch, wide, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = main_in_process(["inspect", "--scale", "tiny", "--set", 'model.attention="\\u001b[2J[/]"'],
                                     capsys)
    assert code == 1
    assert len(_lines(err)) == 1 and "unknown attention" in err, err
    _assert_shown_as_text("\x1b[2J[/]", err)


def test_a_usage_error_quoting_the_command_line_is_text(capsys):
    option = "--bo\u202egus\x1b[2J"  # a right-to-left override too, which click itself lets through
    code, out, err = main_in_process(["inspect", option], capsys)
    assert code == 2
    assert "\u202e" not in err and "\x1b" not in err and "--bo\\u202egus\\x1b[2J" in err, err
