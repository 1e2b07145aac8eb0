"""The docs that live in the repository stay true to the code that cites them.

Rules of this module:
- Every "house rule N" cited in the code (fastimds/, tests/, bench/,
  loadtest/) or in the repository's Markdown is a numbered heading under
  "House rules" in docs/architecture.md, and every "spec §N" a section
  heading of docs/azure-imds.md.
- Tolerant of how a citation is spelled: "house rule 5", "House rules 4 and
  6", "house rules 4-6", a comment wrapped between "house" and "rule",
  "spec §8's", "spec §3.3, §3.5", "spec.md §4 and §5". Strict about the
  target: an exact heading must exist, so §3 does not stand in for §3.4.
- Every fastimds/... path named in README.md or docs/ exists, and every
  relative link in them, tuning.md, reliability.md and contrib/README.md
  lands on a file and, with a #fragment, on an anchor.
- Every dotted reference `fastimds.x.y` in the package's comments and
  docstrings, in docs/*.md and in README.md names an existing module, or a
  top-level def, class or assignment of one (`fastimds.imds.render.Reply`;
  not a name it merely imports; what follows that name, `.method`, is not
  checked): a module that moves or a name that goes cannot leave its old
  name behind in the prose.
- No sockets, no server: a fast test, read-only.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = next(parent for parent in Path(__file__).resolve().parents if (parent / "pyproject.toml").is_file())
ARCHITECTURE = REPO / "docs" / "architecture.md"
AZURE_IMDS = REPO / "docs" / "azure-imds.md"
# Where citations are looked for: the code, the tests, the benchmarks, and the Markdown.
CITING_FOLDERS = ("fastimds", "tests", "bench", "loadtest")
# Markdown whose fastimds/... paths and links must resolve.
PATH_CHECKED_DOCS = (REPO / "README.md", ARCHITECTURE, AZURE_IMDS)
# Markdown whose relative links must land (tuning.md's point into bench/published/).
LINK_CHECKED_DOCS = (*PATH_CHECKED_DOCS, REPO / "tuning.md", REPO / "reliability.md", REPO / "contrib" / "README.md")
HOUSE_RULE_COUNT = 15

# "house rule 5", "house rules 4 and 6", "house rules 4, 6 and 9", "house rules 4-6".
_HOUSE_CITATION = re.compile(
    r"\bhouse\s+rules?\s+(?P<numbers>\d+(?:\s*(?:,|and|or|&|-|–|to)\s*\d+)*)",
    re.IGNORECASE,
)
# "spec §8", "spec §3.3, §3.5", "spec.md §4 and §5": every further section keeps its §.
_SPEC_SECTION = r"§\s*\d+(?:\.\d+)*"
_SPEC_CITATION = re.compile(
    rf"\bspec(?:\.md)?\s*(?P<sections>{_SPEC_SECTION}(?:\s*(?:,|and|or|&)\s*{_SPEC_SECTION})*)",
    re.IGNORECASE,
)
# A line break inside a comment ("house\n    # rule 5") or a docstring is a space.
_COMMENT_BREAK = re.compile(r"\s*\n\s*(?:#\s*)?")

_HOUSE_RULE_HEADING = re.compile(r"^#{2,6}\s+House rule (\d+)\b", re.MULTILINE)
_SPEC_HEADING = re.compile(r"^#{2,6}\s+§(\d+(?:\.\d+)*)\s", re.MULTILINE)
_REPO_PATH = re.compile(r"(?<![\w./-])fastimds/[\w./-]*")
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
_ANCHOR_ID = re.compile(r"<a id=\"([^\"]+)\"></a>")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)
# "fastimds.http.memo", "fastimds.imds.render.make_reply"; not "python -m fastimds" nor "fastimds/http".
_DOTTED_REFERENCE = re.compile(r"(?<![\w./-])fastimds(?:\.[A-Za-z_]\w*)+")
# Prose whose dotted references must resolve (the package's comments and docstrings too: see dotted_references).
DOTTED_CHECKED_DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))


def house_rules_cited(text: str) -> list[int]:
    """Every house rule number `text` cites, ranges expanded."""
    found: list[int] = []
    for match in _HOUSE_CITATION.finditer(_COMMENT_BREAK.sub(" ", text)):
        parts = re.split(r"\s*(,|and|or|&|-|–|to)\s*", match["numbers"])
        numbers, separators = [int(part) for part in parts[::2]], parts[1::2]
        found.append(numbers[0])
        for separator, number in zip(separators, numbers[1:], strict=True):
            if separator in ("-", "–", "to"):
                found.extend(range(found[-1] + 1, number + 1))
            else:
                found.append(number)
    return found


def spec_sections_cited(text: str) -> list[str]:
    """Every spec section `text` cites, as "3.5"."""
    return [
        section.replace(" ", "")
        for match in _SPEC_CITATION.finditer(_COMMENT_BREAK.sub(" ", text))
        for section in re.findall(r"§\s*(\d+(?:\.\d+)*)", match["sections"])
    ]


def citing_files() -> Iterator[Path]:
    for folder in CITING_FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".md") and "__pycache__" not in path.parts and path.is_file():
                yield path
    yield from sorted(REPO.glob("*.md"))
    yield from sorted((REPO / "docs").glob("*.md"))


def citations() -> list[tuple[str, str, str]]:
    """(file, kind, target) for every citation in the repository."""
    found = []
    for path in citing_files():
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(REPO))
        found += [(name, "house rule", str(number)) for number in house_rules_cited(text)]
        found += [(name, "spec", section) for section in spec_sections_cited(text)]
    return found


def house_rule_headings() -> list[int]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("\n## House rules", 1)[1].split("\n## ", 1)[0]
    return [int(number) for number in _HOUSE_RULE_HEADING.findall(section)]


def spec_headings() -> list[str]:
    return _SPEC_HEADING.findall(AZURE_IMDS.read_text(encoding="utf-8"))


def unresolved(cited: list[tuple[str, str, str]], rules: set[str], sections: set[str]) -> list[str]:
    """The citations whose target is missing, as "file: kind target"."""
    targets = {"house rule": rules, "spec": sections}
    return [f"{name}: {kind} {target}" for name, kind, target in cited if target not in targets[kind]]


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    return set(_ANCHOR_ID.findall(text)) | {slug(heading) for heading in _HEADING.findall(text)}


def dotted_references() -> list[tuple[str, str]]:
    """("file:line", reference) for every fastimds.x.y in the package's comments and docstrings and the docs."""
    found = []
    for path in sorted((REPO / "fastimds").rglob("*.py")):
        name = str(path.relative_to(REPO))
        for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
            if token.type in (tokenize.COMMENT, tokenize.STRING):
                for offset, line in enumerate(token.string.splitlines()):
                    found += [(f"{name}:{token.start[0] + offset}", ref) for ref in _DOTTED_REFERENCE.findall(line)]
    for doc in DOTTED_CHECKED_DOCS:
        name = str(doc.relative_to(REPO))
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            found += [(f"{name}:{number}", ref) for ref in _DOTTED_REFERENCE.findall(line)]
    return found


def module_source(module: str, root: Path = REPO) -> Path | None:
    """The file of a dotted module name (a package's __init__.py), or None when there is none."""
    path = root.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(source: Path) -> set[str]:
    """What a module defines at its top level: defs, classes, assignments (read, never imported).

    Not what it imports: `fastimds.control.writer.Follower` would pass while the
    Follower lives in fastimds.bus.follower, the stale name this check is for.
    """
    names: set[str] = set()
    for node in ast.parse(source.read_text(encoding="utf-8"), str(source)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(leaf.id for target in targets for leaf in ast.walk(target) if isinstance(leaf, ast.Name))
    return names


def dangling(references: list[tuple[str, str]], root: Path = REPO) -> list[str]:
    """The references that name no module nor a top-level name of one, as "where: reference"."""
    broken = []
    for where, reference in references:
        parts = reference.split(".")
        # The longest prefix that is a module; the part after it, if any, must be defined in it.
        for length in range(len(parts), 0, -1):
            source = module_source(".".join(parts[:length]), root)
            if source is not None:
                break
        if source is None or (length < len(parts) and parts[length] not in top_level_names(source)):
            broken.append(f"{where}: {reference}")
    return broken


# ---- the citation parser ----


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("Failures are replies, not exceptions (house rule 10).", [10]),
        ("House rules 4 and 6 say so", [4, 6]),
        ("house rules 4, 6 and 9", [4, 6, 9]),
        ("house rules 4-6", [4, 5, 6]),
        ("the house\n    # rule 5 comment wraps", [5]),
        ("(house rule: not per request)", []),
        ("a house ruled by 3 cats", []),
    ],
)
def test_house_rule_citations_are_read_however_spelled(text: str, numbers: list[int]) -> None:
    assert house_rules_cited(text) == numbers


@pytest.mark.parametrize(
    ("text", "sections"),
    [
        ("(spec §3.1).", ["3.1"]),
        ("spec §8's sample", ["8"]),
        ("as spec §8: ~10 min", ["8"]),
        ("Source: ../shared/azure-imds/spec.md §4 and §5 (tag [D]).", ["4", "5"]),
        ("spec §3.3, §3.5", ["3.3", "3.5"]),
        ("spec §8, 2 minutes later", ["8"]),
        ("a lingering close (RFC 9112 §9.6)", []),
    ],
)
def test_spec_citations_are_read_however_spelled(text: str, sections: list[str]) -> None:
    assert spec_sections_cited(text) == sections


def test_a_citation_with_no_heading_is_reported() -> None:
    cited = [("a.py", "house rule", "16"), ("a.py", "spec", "3"), ("b.py", "spec", "3.4")]
    assert unresolved(cited, rules={"1", "16"}, sections={"3.4"}) == ["a.py: spec 3"]


@pytest.mark.parametrize(
    ("text", "references"),
    [
        ("(fastimds.http.memo)", ["fastimds.http.memo"]),
        ("see fastimds.imds.render.make_reply.", ["fastimds.imds.render.make_reply"]),
        ("fastimds.bus.layout and fastimds.imds", ["fastimds.bus.layout", "fastimds.imds"]),
        ("python -m fastimds serve; fastimds/http/memo.py; fastimds logs", []),
    ],
)
def test_dotted_references_are_found_in_prose(text: str, references: list[str]) -> None:
    assert _DOTTED_REFERENCE.findall(text) == references


def test_a_dotted_reference_to_nothing_is_reported() -> None:
    references = [
        ("a.py:1", "fastimds.http.memo"),  # a module
        ("a.py:2", "fastimds.imds"),  # a package
        ("a.py:3", "fastimds.imds.render.make_reply"),  # a def
        ("a.py:4", "fastimds.imds.render.ERRORS"),  # an assignment
        ("a.py:5", "fastimds.imds.render.Reply.head"),  # a class; its attribute is not checked
        ("a.py:6", "fastimds.control.protocol"),  # a module that moved away
        ("a.py:7", "fastimds.ops.event_log.log_event"),  # a name that went
        ("a.py:8", "fastimds.control.writer.Follower"),  # imported there, defined in fastimds.bus.follower
        ("a.py:9", "fastimds.nowhere.at_all"),  # no module at all
    ]
    assert dangling(references) == [
        "a.py:6: fastimds.control.protocol",
        "a.py:7: fastimds.ops.event_log.log_event",
        "a.py:8: fastimds.control.writer.Follower",
        "a.py:9: fastimds.nowhere.at_all",
    ]


# ---- the repository ----


def test_house_rules_are_numbered_1_to_15_once_each() -> None:
    assert house_rule_headings() == list(range(1, HOUSE_RULE_COUNT + 1))
    ids = set(_ANCHOR_ID.findall(ARCHITECTURE.read_text(encoding="utf-8")))
    assert {f"house-rule-{number}" for number in range(1, HOUSE_RULE_COUNT + 1)} <= ids


def test_spec_sections_are_headed_once_each() -> None:
    headings = spec_headings()
    assert len(headings) == len(set(headings)), headings
    assert {"3.1", "3.3", "3.5", "3.6", "4", "5", "7", "8", "9", "10"} <= set(headings)


def test_the_code_cites_something() -> None:
    kinds = {kind for _name, kind, _target in citations()}
    assert kinds == {"house rule", "spec"}  # the scan reads the code: an empty scan would pass vacuously


def test_every_citation_resolves_into_docs() -> None:
    rules = {str(number) for number in house_rule_headings()}
    assert unresolved(citations(), rules, set(spec_headings())) == []


def test_every_dotted_reference_names_a_module_or_its_name() -> None:
    references = dotted_references()
    where = {reference.split(":")[0] for reference, _name in references}
    assert "fastimds/http/connection.py" in where  # the scan reads the code: an empty scan would pass vacuously
    assert dangling(references) == []


@pytest.mark.parametrize("doc", PATH_CHECKED_DOCS, ids=lambda path: path.name)
def test_every_package_path_in_the_docs_exists(doc: Path) -> None:
    paths = {match.rstrip(".,") for match in _REPO_PATH.findall(doc.read_text(encoding="utf-8"))}
    assert paths, f"{doc.name} names no fastimds/ path"
    assert sorted(path for path in paths if not (REPO / path).exists()) == []


@pytest.mark.parametrize("doc", LINK_CHECKED_DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_lands(doc: Path) -> None:
    broken = []
    for target in _LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file_part, _, fragment = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists() or (fragment and linked.suffix == ".md" and fragment not in anchors(linked)):
            broken.append(target)
    assert broken == []
