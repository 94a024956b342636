"""Every ``certprune ...`` command that README.md and docs/ show parses against the CLI as it is, so the docs cannot
drift from it: the subcommand exists, each flag is one of its options and its value has the option's type, required
options are given, and the config a training command builds (its file, ``--set`` overrides and flags) validates. Every
relative link of the pages reaches a file, and the heading it names.

Commands are read from shell code blocks (``sh``, ``bash``, ``console`` or none; ``python`` blocks are code) and from
inline code spans that start with ``certprune``; ``python -m certprune`` and ``torchrun ... -m certprune`` count too.
A shell variable (``$S``) stands for a value the page cannot show and is parsed as ``0``; a bare ``certprune NAME``
names a command and is only checked to exist. The files that ``--model``, ``--weights`` and ``--dataset`` name are
the reader's own: their forms are checked, not their contents."""
import re
import shlex
from pathlib import Path

import click
import pytest

from certprune import cli_common
from certprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}
FENCE = re.compile(r"^\s*```\s*([\w-]*)")
INLINE = re.compile(r"`(certprune [^`]+)`")
SHELL_VARIABLE = re.compile(r"\$\{?\w+\}?")
LEADING_WORDS = {"do", "then", "else", "time"}  # shell words before a command on the same line


def _command_args(words: list[str]) -> list[str] | None:
    """The arguments after ``certprune`` (or ``-m certprune``) in one simple shell command; None for other programs."""
    while words and (words[0] in LEADING_WORDS or re.fullmatch(r"\w+=\S*", words[0])):
        words = words[1:]
    if words[:1] == ["certprune"]:
        return words[1:]
    for index, word in enumerate(words[:-1]):
        if word == "-m" and words[index + 1] == "certprune":
            return words[index + 2:]
    return None


def _shell_commands(line: str) -> list[list[str]]:
    """A logical shell line split into simple commands at ``;``, ``&&``, ``|`` and the like; comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token and set(token) <= set(lexer.punctuation_chars):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [*commands, words]


def shown_commands(text: str) -> list[str]:
    """Each ``certprune`` command of a Markdown page, as the argument string after ``certprune``, in page order."""
    found, prose, block, language = [], [], None, None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and block is None:
            block, language = [], fence.group(1).lower()
        elif fence:
            if language in SHELL_BLOCKS:
                for logical in "\n".join(block).replace("\\\n", " ").splitlines():
                    found += [shlex.join(args) for words in _shell_commands(logical)
                              if (args := _command_args(words)) is not None]
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    for span in INLINE.findall("\n".join(prose)):
        found.append(shlex.join(shlex.split(span.replace("\n", " "))[1:]))
    return found


def parse(arguments: str) -> None:
    """Parse ``certprune <arguments>`` as the CLI would, short of running it; click's error when it does not parse."""
    args = [SHELL_VARIABLE.sub("0", arg) for arg in shlex.split(arguments)]
    name_at = next((i for i, arg in enumerate(args) if not arg.startswith("-")), len(args))
    try:
        group = main.make_context("certprune", args[:name_at + 1])
        if name_at == len(args):
            return
        command = main.get_command(group, args[name_at])
        if command is None:
            raise click.UsageError(f"no such command {args[name_at]!r}")
        if name_at == len(args) - 1:  # a bare `certprune NAME` names the command; it is no invocation
            return
        params = command.make_context(args[name_at], args[name_at + 1:], parent=group).params
    except click.exceptions.Exit as answered:  # --help or --version: answered before any work
        assert answered.exit_code == 0
        return
    if "config_path" in params:  # a training command: the config that its file and flags make
        cli_common.build_config(**params)


DOCUMENTED = [(page.relative_to(ROOT).as_posix(), command)
              for page in PAGES for command in shown_commands(page.read_text())]


@pytest.mark.parametrize("page, command", DOCUMENTED, ids=[f"{page}: {command[:70]}" for page, command in DOCUMENTED])
def test_every_documented_command_parses(page, command, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths (configs/...) are relative to the repository root
    monkeypatch.setattr(cli_common, "with_origin", lambda config: config, raising=False)  # the reader's model files
    parse(command)


def test_the_readme_and_every_docs_page_with_commands_are_read():
    pages = {page for page, _ in DOCUMENTED}
    assert "README.md" in pages and any(page.startswith("docs/") for page in pages)
    assert {command.split()[0] for _, command in DOCUMENTED} >= {"prune", "verify", "certify", "evaluate", "sweep"}


def test_commands_are_found_in_blocks_lines_and_inline_spans_but_not_in_python():
    page = "\n".join([
        "Run `certprune verify --from",
        "RUN --max 5` once.",
        "```sh",
        "make demo   # not certprune",
        "certprune prune --k 0.1 \\",
        "    --out runs/x   # a comment",
        "OMP_NUM_THREADS=1 python -m certprune -q sweep --config c.yaml --out s && certprune plot s",
        "for S in 0 1; do certprune prune --seed $S; done",
        "torchrun --nproc_per_node=2 -m certprune certify --from runs/h",
        "```",
        "```python",
        "certprune prune --not-a-command",
        "```",
    ])
    assert shown_commands(page) == [
        "prune --k 0.1 --out runs/x", "-q sweep --config c.yaml --out s", "plot s", "prune --seed '$S'",
        "certify --from runs/h", "verify --from RUN --max 5"]


@pytest.mark.parametrize("command, error", [
    ("prune --k 0.1 --no-such-flag 1", "No such option"),
    ("prunes --k 0.1", "no such command"),
    ("prunes", "no such command"),
    ("evaluate --from RUN --attack fgsm", "is not one of"),
    ("verify --from RUN --max all", "is not a valid integer"),
    ("certify --sigma 0.25", "Missing"),
    ("sweep --out s --set prune.no_such_key=1", "unknown config key"),
    ("sweep --out s --config configs/no-such-file.yaml", "does not exist"),
])
def test_a_command_the_cli_would_refuse_fails_to_parse(command, error, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(Exception, match=error):
        parse(command)


def test_help_and_version_parse():
    parse("--version")
    parse("prune --help")


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_every_relative_link_reaches_a_file_and_its_heading(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        assert not anchor or anchor in _anchors(linked), f"{page.name} links to {target}: no such heading"
