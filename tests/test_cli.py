"""services/cli.py: every command and flag documented, defaults shown, `cme up --config`."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from services import cli


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command parser of the tree, with its path from `cme`."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def help_of(parser: argparse.ArgumentParser) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    return out.getvalue()


def test_every_flag_of_every_command_has_help_and_shows_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.delenv("CME_REDIS_URL", raising=False)
    seen = 0
    for path, parser in commands(cli.build_parser()):
        text = " ".join(help_of(parser).split())  # unwrapped
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            where = f"cme {' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help text"
            seen += 1
            if not action.option_strings or action.nargs == 0 or action.required:
                continue  # positionals and required flags have no default; switches are off unless given
            shown = " ".join(cli.HelpFormatter(prog="cme")._get_help_string(action).split())
            assert "default" in shown, f"{where}: its default is not shown"
            if action.default is not None and "%(default)" in shown:
                assert f"(default: {action.default})" in text, f"{where}: default not in --help"
    assert seen > 100


def test_cme_help_lists_every_command_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    parser = cli.build_parser()
    text = help_of(parser)
    names = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in names:
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert line.split(None, 1)[1].strip(), f"`{name}` has its help on another line"


def test_up_passes_the_tuning_flags_to_the_services() -> None:
    from services.supervisor import StackConfig

    args = cli.parse(["up", "--rate-limit", "7", "--max-lag", "9", "--depth-interval", "0.5", "--batch", "3"])
    extra = StackConfig.from_args(args).extra
    assert extra["gateway"] == ["--rate-limit", "7.0", "--max-lag", "9"]
    assert extra["feeds"] == ["--depth-interval", "0.5"]
    assert extra["matcher"][-2:] == ["--batch", "3"]
    # Each service accepts what it is given.
    cli.parse(["gateway", *extra["gateway"]])
    cli.parse(["feeds", *extra["feeds"]])
    cli.parse(["matcher", *extra["matcher"]])


def test_up_config_file_sets_defaults_and_the_command_line_wins(tmp_path: Path) -> None:
    config = tmp_path / "stack.toml"
    config.write_text('rate-limit = 100\ngateways = 2\nlog_format = "json"\nprometheus = true\n')
    args = cli.parse(["up", "--config", str(config), "--gateways", "3"])
    assert args.rate_limit == 100.0 and args.log_format == "json" and args.prometheus is True
    assert args.gateways == 3


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("rate_limt = 1", "unknown key 'rate_limt'"),
        ("gateways = 1.5", "gateways must be an integer"),
        ('max-lag = "10"', "max-lag must be an integer"),
        ("prometheus = 1", "prometheus must be true or false"),
        ('log-format = "xml"', "log-format must be one of text, json"),
        ("rate-limit = ", "stack.toml"),
    ],
)
def test_up_config_file_errors_name_the_key(
    tmp_path: Path, text: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "stack.toml"
    config.write_text(text + "\n")
    with pytest.raises(SystemExit) as exit_:
        cli.parse(["up", "--config", str(config)])
    assert exit_.value.code == 2 and error in capsys.readouterr().err
