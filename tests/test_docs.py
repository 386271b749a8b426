"""The docs' commands still work: every `python ...` command in the code blocks of README.md and
docs/*.md names a module or script that exists, flags that command has, config keys that exist and
config files that exist; and each command's `--help` runs."""

import functools
import importlib.util
import re

import pytest

from resnet_jax import defaults
from tests.conftest import ROOT, run_script

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.S)
PROGRAM = re.compile(r"\bpython3? (-m [\w.]+|[\w./-]+\.py)")
PLACEHOLDER_KEYS = {"key", "KEY"}  # `--config.KEY=VALUE` in usage lines


def doc_commands() -> list[tuple[str, str, str]]:
    """(doc file, program, the rest of its command) for every python command in a code block."""
    found = []
    for path in DOCS:
        for block in BLOCK.findall(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                for segment in re.split(r"&&|\|\||;|\|", line):
                    match = PROGRAM.search(segment)
                    if match:
                        found.append((path.name, match.group(1), segment[match.end() :]))
    return found


COMMANDS = doc_commands()
PROGRAMS = sorted({program for _, program, _ in COMMANDS})


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 30 and {"train.py", "benchmark.py", "-m resnet_jax.prepare"} <= set(PROGRAMS)


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_documented_program_exists(program):
    if program.startswith("-m "):
        assert importlib.util.find_spec(program[3:]) is not None, program
    else:
        assert (ROOT / program).is_file(), program


@functools.cache
def flags_of(program: str) -> frozenset[str]:
    """The flags `program --help` lists (absl's `--[no]flag` gives both spellings)."""
    result = run_script(*program.split(), "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, f"{program} --help: {result.stderr[-2000:]}"
    names = set()
    for negatable, name in re.findall(r"--(\[no\])?([A-Za-z_][\w-]*)", result.stdout):
        names |= {name, f"no{name}"} if negatable else {name}
    return frozenset(names | {"help"})


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_documented_flag_config_key_and_config_file_exists(program):
    known_keys = set(defaults.get_config().keys())
    problems = []
    for doc, command_program, rest in COMMANDS:
        if command_program != program:
            continue
        for token in re.sub(r"[\[\]\"']", " ", rest).split():  # optional [...] and quotes dropped
            if token.startswith("--config."):
                key = token[len("--config.") :].split("=")[0].split(".")[0]
                if key not in known_keys | PLACEHOLDER_KEYS:
                    problems.append(f"{doc}: {program} {token}: no config key {key!r}")
                if "config" not in flags_of(program):
                    problems.append(f"{doc}: {program} {token}: {program} takes no --config")
            elif token.startswith("--"):
                flag = token[2:].split("=")[0]
                if flag not in flags_of(program):
                    problems.append(f"{doc}: {program} {token}: not a flag of {program}")
            if re.fullmatch(r"(--config=)?configs/\w+\.py", token):
                path = token.removeprefix("--config=")
                if not (ROOT / path).is_file():
                    problems.append(f"{doc}: {program}: {path} does not exist")
    assert not problems, "\n".join(problems)


def test_the_cheapest_documented_command_runs():
    result = run_script("-m", "resnet_jax.models", "--no_flops")
    assert result.returncode == 0 and "resnet50" in result.stdout, result.stderr[-2000:]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path) -> set[str]:
    found, seen = set(), {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_every_link_between_the_docs_reaches_a_file_and_a_heading():
    problems = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{path.name}: ({target}): {file_part} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{path.name}: ({target}): no heading #{anchor} in {linked.name}")
    assert not problems, "\n".join(problems)


def test_the_config_table_lists_every_choice_of_every_key_with_choices():
    """defaults.py names the registry of each key with choices instead of copying them (copies
    drift); docs/training.md spells them out, so this keeps its table complete."""
    from resnet_jax.config_checks import DOMAINS, Choice

    rows = [
        line for line in (ROOT / "docs" / "training.md").read_text().splitlines() if line.startswith("| `")
    ]
    for key, domain in DOMAINS.items():
        if not isinstance(domain, Choice) or key == "model":  # the model row names the families
            continue
        row = next((r for r in rows if f"`{key}`" in r.split("|")[1]), None)
        assert row is not None, f"docs/training.md has no row for config.{key}"
        missing = [name for name in domain.names() if f"`{name}`" not in row]
        assert not missing, f"docs/training.md's row of config.{key} lacks {missing}"
