"""The README and docs/ stay true: every relative link and image resolves, every `python <script>.py`
and `make <target>` line in README.md names a script, flags and targets that exist, README.md stays
short, and `make help` lists every target.

Commands are parsed with the script's own argparse parser, never run: the script is executed as
__main__ only up to the moment it asks its parser to parse, and that parser is kept.
"""
import argparse
import contextlib
import io
import re
import runpy
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKDOWN_FILES = [README] + sorted((REPO / "docs").glob("**/*.md"))
README_MAX_LINES = 350

FENCE = re.compile(r"^(```|~~~)")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]+`")
# [text](target) and ![alt](target), with an optional "title"; and <img src="target">
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
MAKE_TARGET = re.compile(r"^([A-Za-z0-9][\w.-]*)\s*:(?!=)")


def split_prose_and_code(text):
    """(prose, code blocks): the text outside fenced code blocks, and each block's lines."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
        elif block is None:
            prose.append(line)
        else:
            block.append(line)
    return "\n".join(prose), blocks


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every heading anchor of a markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    prose, _ = split_prose_and_code(path.read_text(encoding="utf-8"))
    seen = {}
    for line in prose.splitlines():
        match = HEADING.match(line)
        if match:
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            yield anchor if count == 0 else f"{anchor}-{count}"


def relative_links(path):
    """(target, line number) of every link and image in the rendered text of a markdown file."""
    text = HTML_COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text(encoding="utf-8"))
    prose, _ = split_prose_and_code(text)  # line numbers below count prose lines only: good enough to find it
    for number, line in enumerate(prose.splitlines(), 1):
        line = INLINE_CODE.sub("", line)
        for target in MD_LINK.findall(line) + HTML_SRC.findall(line):
            if not re.match(r"^[a-zA-Z][\w+.-]*:", target):  # http:, https:, mailto: are not ours to check
                yield target, number


def all_links():
    return [(path, target, number) for path in MARKDOWN_FILES for target, number in relative_links(path)]


@pytest.mark.parametrize("path,target,number", all_links(),
                         ids=lambda value: str(value.relative_to(REPO)) if isinstance(value, Path) else str(value))
def test_every_relative_link_and_image_resolves(path, target, number):
    error = link_error(path, target)
    assert error is None, f"{path.relative_to(REPO)} (prose line {number}) links to {target}, {error}"


def link_error(path, target):
    """Why the link `target` in the markdown file `path` leads nowhere, or None."""
    file_part, _, anchor = target.partition("#")
    linked = (path.parent / file_part).resolve() if file_part else path
    if not linked.exists():
        return "which does not exist: fix the link or add the file"
    if anchor and linked.suffix == ".md" and anchor not in set(anchors(linked)):
        return f"but {linked.name} has no heading with that anchor"
    return None


def test_a_link_to_a_missing_file_or_heading_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `page`: its title\n\n## Second part\n", encoding="utf-8")
    assert link_error(page, "page.md#a-page-its-title") is None
    assert link_error(page, "#second-part") is None
    assert link_error(page, "#third-part") is not None
    assert link_error(page, "other.md") is not None


# ---- Commands in README.md -----------------------------------------------------------------------

def command_lines(text):
    """Every shell command of README.md: code-block lines (backslash continuations joined, comments
    dropped) and inline code spans that start with python, make, torchrun or an environment variable."""
    prose, blocks = split_prose_and_code(text)
    for block in blocks:
        joined = "\n".join(block).replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                yield line
    for span in INLINE_CODE.findall(prose):
        span = span.strip("`").strip()
        if re.match(r"^(\S*python3?|make|torchrun|[A-Z_]+=\S+)\s", span):
            yield span


def is_placeholder(token):
    """<...> stands for a value or for flags; ..., $VAR and $(...) for what the reader fills in."""
    return (token.startswith("<") and token.endswith(">")) or token == "..." or token.startswith("$")


def script_invocation(tokens):
    """(script, its arguments) when the command runs a Python script, else None."""
    for i, token in enumerate(tokens):
        if re.search(r"(^|/)python3?$", token):
            rest = tokens[i + 1:]
            if rest and rest[0].endswith(".py"):
                return rest[0], rest[1:]
            return None  # python -m ..., python -c ...: not a script of this repository
        if re.search(r"(^|/)torchrun$", token):
            for j in range(i + 1, len(tokens)):
                if tokens[j].endswith(".py"):
                    return tokens[j], tokens[j + 1:]
    return None


def make_targets_of(tokens):
    """The targets a `make ...` command names (variables and flags skipped), else None."""
    tokens = [t for t in tokens if not re.match(r"^[A-Za-z_]+=", t)]
    if not tokens or tokens[0] != "make":
        return None
    return [t for t in tokens[1:] if not t.startswith("-")]


def readme_commands():
    commands = []
    for line in dict.fromkeys(command_lines(README.read_text(encoding="utf-8"))):  # each once, in order
        try:
            tokens = shlex.split(line)
        except ValueError:
            tokens = line.split()
        if script_invocation(tokens) or make_targets_of(tokens):
            commands.append((line, tokens))
    return commands


class _ParserReached(BaseException):
    """Raised when a script asks its parser to parse: the script goes no further."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


_parsers = {}


def parser_of(script):
    """The argparse parser a script builds, found by running it as __main__ until it parses."""
    if script not in _parsers:
        original = argparse.ArgumentParser.parse_args

        def stop(self, *args, **kwargs):
            raise _ParserReached(self)

        argparse.ArgumentParser.parse_args = stop
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
            _parsers[script] = None  # it never asked argparse for its flags
        except _ParserReached as reached:
            _parsers[script] = reached.parser
        finally:
            argparse.ArgumentParser.parse_args = original
    return _parsers[script]


def value_for(action):
    """A value the flag accepts, in place of a <placeholder>."""
    return str(action.choices[0]) if action.choices else "1"


def fill_placeholders(arguments, parser):
    """The arguments with each <placeholder> given a valid value where it is a flag's value, and dropped
    where it stands for flags of its own (<DEMO_MODEL>)."""
    filled = []
    for token in arguments:
        if "=" in token and token.startswith("--") and is_placeholder(token.partition("=")[2]):
            flag = token.partition("=")[0]
            action = parser._option_string_actions.get(flag)
            filled.append(f"{flag}={value_for(action) if action else '1'}")
        elif is_placeholder(token):
            action = parser._option_string_actions.get(filled[-1]) if filled else None
            if action is not None and action.nargs != 0:
                filled.append(value_for(action))
        else:
            filled.append(token)
    return filled


def makefile_targets():
    lines = (REPO / "Makefile").read_text(encoding="utf-8").splitlines()
    return {m.group(1) for m in map(MAKE_TARGET.match, lines) if m and not m.group(1).startswith(".")}


def command_error(line, tokens):
    """Why README.md's command `line` would not run as written (no such script, target or flag), or None."""
    targets = make_targets_of(tokens)
    if targets is not None:
        missing = sorted(set(targets) - makefile_targets())
        return f"the Makefile has no target {', '.join(missing)}" if missing else None
    script, arguments = script_invocation(tokens)
    if not (REPO / script).is_file():
        return f"there is no {script} in the repository"
    parser = parser_of(script)
    if parser is None:
        return f"{script} does not parse its command line with argparse"
    filled = fill_placeholders(arguments, parser)
    # A command with `...` or a placeholder for several flags shows only some flags: check those.
    partial = len(filled) < len(arguments)
    required = [action for action in parser._actions if action.required]
    errors = io.StringIO()
    try:
        for action in required if partial else []:
            action.required = False
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(filled)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return f"{script} refuses it: {errors.getvalue().strip().splitlines()[-1]}"
    finally:
        for action in required:
            action.required = True
    return None


@pytest.mark.parametrize("line,tokens", readme_commands(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_readme_command_names_a_script_and_flags_that_exist(line, tokens):
    error = command_error(line, tokens)
    assert error is None, f"README.md runs `{line}`, but {error}"


@pytest.mark.parametrize("line", [
    "python train.py --data-folder data --no-such-flag",
    "python eval.py --checkpoint best.pt --data-folder data --beam-size three",
    "python train.py --attention <kind> --epochs",
    "python no_such_script.py --help",
    "make no-such-target",
])
def test_a_command_with_a_wrong_script_flag_value_or_target_is_caught(line):
    assert command_error(line, shlex.split(line)) is not None


def test_placeholders_become_valid_values_or_are_dropped():
    tokens = shlex.split("python train.py --data-folder <folder> <DEMO_MODEL> --attention <kind> --epochs <N>")
    assert command_error("", tokens) is None
    assert command_error("", shlex.split("OMP_NUM_THREADS=1 python train.py ...")) is None


def test_readme_lists_commands_to_check():
    """The command test above checks something: the README's own quick start is among them."""
    lines = [line for line, _ in readme_commands()]
    assert any(line.startswith("make demo") for line in lines)
    assert any(re.search(r"python train\.py ", line) for line in lines)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, over {README_MAX_LINES}: move records and "
                                       f"long explanations to docs/ and link them")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_lists_every_target_with_a_line_of_text():
    shown = subprocess.run(["make", "--no-print-directory", "-s", "help"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    described = {line.split()[0] for line in shown.splitlines() if len(line.split()) > 1}
    missing = sorted(makefile_targets() - described)
    assert not missing, (f"make help does not describe {', '.join(missing)}: end each target's line in the "
                         f"Makefile with `## what it does`")
