"""Every code block of README.md and docs/**/*.md runs.

```python blocks run in order, in one namespace per page, in a temporary folder; ```bash blocks run
line by line there (`dfa-kernels` as `python -m dfa_kernels` of this interpreter). A block that
needs a GPU, several processes, an install or minutes of training is marked by an HTML comment on
the line before it, ``<!-- skip: REASON -->``: it is skipped with that reason, so pytest lists and
counts it, and ``-m slow`` runs the "minutes" ones. ```text blocks are output, not code. The site
itself must build with ``mkdocs build --strict``."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REASONS = {
    "gpu": "needs a CUDA GPU",
    "multi-process": "starts several processes",
    "minutes": "minutes of training (run with -m slow)",
    "installs": "installs packages",
}
LANGUAGES = ("python", "bash", "text")
SKIP = re.compile(r"<!--\s*skip:\s*(\S+)\s*-->")
FENCE = re.compile(r"(\s*)```(\S*)\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # path relative to the root
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def collect(path: Path, root: Path = ROOT) -> list[Block]:
    """The fenced code blocks of one Markdown page, with the skip reason written right before each."""
    lines, blocks, i = path.read_text().splitlines(), [], 0
    page = path.relative_to(root).as_posix()
    while i < len(lines):
        m = FENCE.fullmatch(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        if lang not in LANGUAGES:
            raise ValueError(f"{page}:{start + 1}: a code block's language must be one of {LANGUAGES}, got {lang!r}")
        body, i = [], i + 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{page}:{start + 1}: code block never closed")
        before = next((s.strip() for s in reversed(lines[:start]) if s.strip()), "")
        marker = SKIP.fullmatch(before)
        if marker and marker.group(1) not in REASONS:
            raise ValueError(
                f"{page}:{start}: unknown skip reason {marker.group(1)!r}; expected one of {sorted(REASONS)}"
            )
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", marker.group(1) if marker else None))
        i += 1
    return blocks


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def run_python(block: Block, namespace: dict) -> None:
    """Run one block in the page's namespace; a failure names the page and line."""
    try:
        exec(compile(block.code, block.where, "exec"), namespace)
    except Exception as err:
        raise AssertionError(f"the python block at {block.where} failed: {type(err).__name__}: {err}") from err


def bash_commands(code: str) -> list[str]:
    """The commands of a bash block: comments dropped, continuation lines joined."""
    commands, current = [], ""
    for line in code.splitlines():
        piece = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if piece.endswith("\\"):
            current += piece[:-1].rstrip() + " "
            continue
        if (current + piece).strip():
            commands.append((current + piece).strip())
        current = ""
    return commands


def run_bash(block: Block, cwd: Path) -> None:
    timeout = 3600 if block.skip == "minutes" else 120  # seconds per command
    for command in bash_commands(block.code):
        words = shlex.split(command)
        if words[0] == "dfa-kernels":
            words = [sys.executable, "-m", "dfa_kernels", *words[1:]]
        try:
            done = subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"the bash block at {block.where}: `{command}` ran over {timeout} s") from err
        assert done.returncode == 0, (
            f"the bash block at {block.where}: `{command}` exited with {done.returncode}:\n{done.stderr[-2000:]}"
        )


BLOCKS = [b for p in pages() for b in collect(p)]
RUNNABLE = [b for b in BLOCKS if b.lang in ("python", "bash")]


def _param(block: Block):
    marks = [pytest.mark.slow] if block.skip == "minutes" else []
    return pytest.param(block, id=block.where, marks=marks)


_pages_state: dict[str, tuple[dict, Path, set]] = {}  # page -> (namespace, folder, lines of blocks run)


def _minutes_enabled(config) -> bool:
    return "slow" in (config.option.markexpr or "")


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_code_block_runs(block, request, tmp_path_factory, monkeypatch):
    run_minutes = _minutes_enabled(request.config)
    if block.skip and not (block.skip == "minutes" and run_minutes):
        pytest.skip(f"{block.skip}: {REASONS[block.skip]} ({block.where})")
    if block.page not in _pages_state:
        _pages_state[block.page] = ({"__name__": "__docs__"}, tmp_path_factory.mktemp("docs"), set())
    namespace, folder, done = _pages_state[block.page]
    monkeypatch.chdir(folder)
    # the page's earlier blocks first (in order), when this one was selected alone
    for earlier in RUNNABLE:
        if (
            earlier.page == block.page
            and earlier.line < block.line
            and earlier.line not in done
            and earlier.lang == "python"
            and (not earlier.skip or (earlier.skip == "minutes" and run_minutes))
        ):
            run_python(earlier, namespace)
            done.add(earlier.line)
    if block.lang == "python":
        run_python(block, namespace)
    else:
        run_bash(block, folder)
    done.add(block.line)


def test_marked_blocks_are_listed_and_counted(capsys):
    marked = [b for b in RUNNABLE if b.skip]
    with capsys.disabled():
        print(
            f"\n{len(marked)} of {len(RUNNABLE)} code blocks are marked: "
            + ", ".join(f"{r} {sum(b.skip == r for b in marked)}" for r in REASONS)
        )
        for b in marked:
            print(f"  {b.where} ({b.lang}): {b.skip}")
    assert 2 * len(marked) <= len(RUNNABLE), "most blocks must run: mark only what cannot run here"
    assert all(b.lang == "bash" for b in marked if b.skip == "installs")


def test_docs_install_commands_are_the_readme_quickstart():
    """docs/getting-started.md repeats the README's two Quickstart commands (.ci/readme_commands.py)."""
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    quickstart = module.quickstart_commands(ROOT / "README.md")
    install = next(b for b in collect(ROOT / "docs" / "getting-started.md") if b.lang == "bash")
    assert bash_commands(install.code) == quickstart and install.skip == "installs"


def test_collector_catches_broken_blocks(tmp_path):
    page = tmp_path / "docs" / "broken.md"
    page.parent.mkdir()
    page.write_text(
        "# A page\n\n```python\nx = 1\n```\n\ntext\n\n```python\ny = x / 0\n```\n\n"
        "<!-- skip: gpu -->\n```python\nimport nothing_here\n```\n\n"
        "```bash\ndfa-kernels no-such-command  # a comment\n```\n"
    )
    first, broken, gpu, bash = collect(page, tmp_path)
    assert (broken.page, broken.line, broken.skip, gpu.skip) == ("docs/broken.md", 9, None, "gpu")
    namespace = {}
    run_python(first, namespace)
    with pytest.raises(AssertionError, match=r"docs/broken.md:9 failed: ZeroDivisionError"):
        run_python(broken, namespace)
    with pytest.raises(AssertionError, match=r"docs/broken.md:18: `dfa-kernels no-such-command` exited with 2"):
        run_bash(bash, tmp_path)
    page.write_text("<!-- skip: later -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="unknown skip reason 'later'"):
        collect(page, tmp_path)
    page.write_text("```python\npass\n")
    with pytest.raises(ValueError, match="never closed"):
        collect(page, tmp_path)
    page.write_text("```\npass\n```\n")
    with pytest.raises(ValueError, match="language must be one of"):
        collect(page, tmp_path)


def test_bash_commands_join_continuations():
    assert bash_commands("# note\na --x 1 \\\n    --y 2   # why\n\nb\n") == ["a --x 1 --y 2", "b"]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (extra docs)")
def test_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "plots" / "step_cpu_avx2.png").exists()  # benchmarks/plots, served by the hook
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert (
        "Direct Feedback Alignment for one network" in api
        and "dfa-kernels train" in (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    )


def test_docstring_fields_render_as_lists():
    """docs/_hooks/docstrings.py: `name: text` entries become list items, roles code spans."""
    spec = importlib.util.spec_from_file_location("docstrings_hook", ROOT / "docs" / "_hooks" / "docstrings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (
        "Summary, see :class:`FeedbackSpec`.\nmode: one\n  continued\nseed, layout: two\n\n"
        "```python\nx: int = 1\n```\nA sentence: not a field."
    )
    assert module.fields_as_list(text) == (
        "Summary, see `FeedbackSpec`.\n\n- `mode`: one\n  continued\n- `seed`, `layout`: two\n\n"
        "```python\nx: int = 1\n```\nA sentence: not a field."
    )
