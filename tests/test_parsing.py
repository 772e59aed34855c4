"""`parse_fast` must agree with the full argparse parser wherever it answers.

The fast path exists only for start-up time (issue 5); argparse defines the
behaviour. Every command line here is parsed both ways.
"""
from __future__ import annotations

import pytest

import tokenroute

AGREEING = [
    ["env"],
    ["env", "--key", "sk-tr-abc123"],
    ["env", "--key=sk-tr-abc123", "--export"],
    ["--json", "env", "--shell", "fish"],
    ["env", "--shell=powershell", "--json"],
    ["env", "--shell", "bash"],
    ["env", "--write", "app.env"],
    ["models"],
    ["models", "--json", "--key", "sk-tr-abc123"],
    ["--api-url", "http://127.0.0.1:9", "balance"],
    ["balance", "--api-url=http://127.0.0.1:9", "--json"],
    ["whoami"],
    ["logout"],
    ["keys", "list", "--json"],
    ["--json", "keys", "create", "--name", "ci"],
    ["keys", "create", "--name", "ci", "--no-cache"],
    ["topup", "--amount", "5"],
    ["topup", "--amount=12.50", "--no-browser"],
    ["usage"],
    ["usage", "--days", "7"],
    ["test", "--model", "openai/gpt-4o"],
    ["login", "--no-wait", "--json"],
    ["login", "--resume", "--timeout", "30"],
    ["login", "--force", "--no-browser"],
    ["doctor", "--key", "sk-tr-abc123"],
    ["status"],
    ["mcp", "--read-only"],
    ["mcp", "--tools", "balance", "--tools=usage,doctor"],  # repeated: each adds its tools
]

# Lines the fast path must leave to argparse: it defines their errors and output.
LEFT_TO_ARGPARSE = [
    ["--json"],
    ["keys"],
    ["keys", "revoke", "key_1"],
    ["completion", "bash"],
    ["models", "-h"],
    ["models", "--ke", "sk-tr-abc123"],
    ["env", "--key"],
    ["env", "--shell", "tcsh"],
    ["usage", "--days", "0"],
    ["usage", "--days", "7.5"],
    ["topup"],
    ["topup", "--amount", "abc"],
    ["topup", "--amount", "-5"],
    ["keys", "create", "--name", ""],
    ["balance", "--bogus"],
    ["balance", "extra"],
    ["env", "--export=yes"],
    ["env", "--write"],  # nargs="?": argparse decides whether a value follows
    ["help", "keys"],
    ["api", "/v1/models"],
    ["api", "-X", "POST", "/api/v1/me/keys", "--json"],
    ["bogus"],
]


@pytest.mark.parametrize("argv", AGREEING, ids=" ".join)
def test_fast_parse_agrees_with_argparse(argv: list[str]) -> None:
    fast = tokenroute.parse_fast(argv)
    full = tokenroute.build_parser().parse_args(argv)

    assert fast is not None, "a common command line should not need argparse"
    expected = {name: value for name, value in vars(full).items() if not name.endswith("command")}
    expected.setdefault("json", False)
    expected.setdefault("api_url", None)
    assert vars(fast) == expected


@pytest.mark.parametrize("argv", LEFT_TO_ARGPARSE, ids=lambda argv: " ".join(argv) or "(none)")
def test_unusual_command_lines_go_to_argparse(argv: list[str]) -> None:
    assert tokenroute.parse_fast(argv) is None


def test_help_lists_every_command_and_global_option(cli) -> None:
    result = cli.run("--help")

    assert result.code == 0 and result.err == ""
    for command in tokenroute.COMMANDS:
        assert f"  {command.name} " in result.out
    for flags, _ in tokenroute.GLOBAL_OPTIONS:
        assert flags[0] in result.out
    assert "--version" in result.out


def test_options_are_never_abbreviated(cli) -> None:
    result = cli.run("models", "--ke", "sk-tr-abc123", "--js")

    assert (result.code, result.out) == (1, "")
    assert result.err.startswith("error: unrecognized arguments: --ke sk-tr-abc1... --js\n")
