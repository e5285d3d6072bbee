"""Every code block of README.md and docs/*.md is run or compiled, so the documentation stays true.

Convention (also for blocks added later):
- Every fence names its language: ``python``, ``cpp``, ``cmake``, ``sh`` or ``text``. An untagged
  fence fails ("tag it").
- ``python``: run in a fresh interpreter (cwd: an empty temporary folder, 180 s timeout).
- ``cpp``: compiled against the installed CMake package (``build/install``, what ``make cpp``
  installs, like ``examples/cpp``) and run in an empty temporary folder. A block without
  ``int main`` is the body of ``main()``; its ``#include`` lines are hoisted to the top.
- ``cmake``: the CMake code that builds the ``cpp`` block right after it, as the target ``app``
  (``project()`` and ``add_executable(app ...)`` are supplied); it is configured and built.
- ``sh``: every command starting with ``halo`` (a line; one ending in ``\\`` or followed by
  indented lines continues there) is parsed by the ``halo`` command's argument parser
  (placeholders in capitals such as ``DIR`` or ``N`` stand for ``1``; ``[--opt]`` is included;
  ``a|b`` takes ``a``; ``...`` is dropped); every ``make TARGET`` names a target of the Makefile;
  ``torchrun`` and ``accelerate launch`` lines are parsed by the launcher's own argument parser;
  any other command may only name repository files (``examples/x.py``) that exist, as must these.
- ``text``: prose, output or formulas; not run.
- An HTML comment right above a fence adjusts it::

      <!-- docs-test: compile-only (why it cannot run here)
      setup code run before the block (python or C++, optional)
      -->

  ``docs-test: run`` (the default) or ``docs-test: compile-only``. Compile-only python blocks
  are byte-compiled and their import statements executed (so every name they import exists);
  compile-only cpp blocks are compiled, not run. Setup lines are part of the test, not of the
  rendered page.
A failure names the file and the line of the fence.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "cpp", "cmake", "sh", "text"}
INSTALL = ROOT / "build" / "install"


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str = "run"  # or "compile-only"
    setup: str = ""

    @property
    def where(self) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{name}:{self.line}"


_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(run|compile-only)\b[^\n]*")


def _directive(lines: list[str], fence: int) -> tuple[str, str]:
    """(mode, setup) from a docs-test comment ending right above line index `fence`."""
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return "run", ""
    k = j
    while k >= 0 and "<!--" not in lines[k]:
        k -= 1
    comment = "\n".join(lines[k : j + 1])
    m = _DIRECTIVE.search(comment)
    if not m:
        return "run", ""
    body = comment[m.end() :].rsplit("-->", 1)[0]
    return m.group(1), body.strip("\n")


def blocks() -> list[Block]:
    out = []
    for path in DOCS:
        lines = path.read_text().split("\n")
        i = 0
        while i < len(lines):
            m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
            if m:
                indent, j = len(m.group(1)), i + 1
                while j < len(lines) and not lines[j].strip().startswith("```"):
                    j += 1
                code = "\n".join(line[indent:] for line in lines[i + 1 : j])
                mode, setup = _directive(lines, i)
                out.append(Block(path, i + 1, m.group(2), code, mode, setup))
                i = j
            i += 1
    return out


BLOCKS = blocks()


def _ids(items: list[Block]) -> list[str]:
    return [b.where for b in items]


def test_every_fence_names_a_known_language():
    bad = [f"{b.where}: fence language {b.lang!r}" for b in BLOCKS if b.lang not in LANGUAGES]
    assert not bad, "tag each fence with one of " + ", ".join(sorted(LANGUAGES)) + ":\n" + "\n".join(bad)


# ---- python ------------------------------------------------------------------------------------------

PYTHON = [b for b in BLOCKS if b.lang == "python"]


def _import_lines(code: str) -> str:
    tree = ast.parse(code)
    return "\n".join(ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))


# Blocks run in children forked from one interpreter that has imported numpy, torch and halo
# once (a fresh interpreter per block costs seconds each): every block still starts from a
# clean state, in its own process and folder, killed after 180 s.
_RUNNER = r"""
import json, os, signal, sys, traceback
import numpy, torch, halo
try:  # the doc examples that build a tiny model use these; load them once
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    pass
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(180)
            os.chdir(req["cwd"])
            log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.argv = [req["script"]]
            exec(compile(open(req["script"]).read(), req["script"], "exec"), {"__name__": "__main__"})
            sys.stdout.flush()
            os._exit(0)
        except SystemExit as exc:
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@pytest.fixture(scope="module")
def python_runner():
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )

    def run(script: Path, cwd: Path) -> tuple[int, str]:
        log = cwd / "block.log"
        proc.stdin.write(json.dumps({"script": str(script), "cwd": str(cwd), "log": str(log)}) + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        assert answer, "the block runner died"
        return int(json.loads(answer)), log.read_text() if log.exists() else ""

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_python_block(block: Block, tmp_path: Path, python_runner):
    try:
        compile(block.code, block.where, "exec")
    except SyntaxError as exc:
        line = block.line + (exc.lineno or 0)
        pytest.fail(f"{block.path.name}:{line} (in the block at {block.where}) does not compile: {exc.msg}")
    body = block.code if block.mode == "run" else _import_lines(block.code)
    script = tmp_path / "block.py"
    script.write_text(block.setup + "\n" + body + "\n")
    code, log = python_runner(script, tmp_path)
    assert code == 0, f"{block.where} ({block.mode}) failed (exit {code}):\n{log[-3000:]}"


# ---- sh ----------------------------------------------------------------------------------------------

SHELL = [b for b in BLOCKS if b.lang == "sh"]


def _cli_parser():
    import halo.cli

    parser = argparse.ArgumentParser(prog="halo", exit_on_error=False)
    subparsers = parser.add_subparsers(dest="command")
    for name in halo.cli.SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _commands(code: str) -> list[str]:
    """Logical lines: a line ending in a backslash, or one that starts indented (a synopsis
    wrapped under its command), continues the one before."""
    out: list[str] = []
    joined = False
    for line in code.split("\n"):
        if out and (joined or (line[:1].isspace() and line.strip())):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
        joined = line.rstrip().endswith("\\")
        if joined:
            out[-1] = out[-1].rstrip()[:-1]
    return [c for c in out if c.strip()]


def _synopsis_args(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    args = []
    for w in words:
        w = w.replace("[", "").replace("]", "")
        if not w or w == "...":
            continue
        w = w.split("|")[0]  # alternatives: the first
        w = w.removesuffix(",...")  # "a,b,...": a list
        args.append("1" if re.fullmatch(r"[A-Z][A-Z_]*", w) else w)  # placeholders
    return args


# A word naming a file of the repository: relative, with a folder and an extension (not an address).
_REPO_PATH = re.compile(r"(?![\d.]+(:\d+)?$)[\w.-]+(/[\w.-]+)+\.\w+")


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


def _launcher_parser(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]] | None:
    """torch's and accelerate's launcher parsers, for `torchrun ...` and `accelerate launch ...`."""
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        return get_args_parser(), words[1:]
    if words[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        return launch_command_parser(), words[2:]
    return None


@pytest.mark.parametrize("block", SHELL, ids=_ids(SHELL))
def test_shell_block_commands_parse(block: Block):
    parser, targets = _cli_parser(), _make_targets()
    for command in _commands(block.code):
        words = shlex.split(command, comments=True)
        if not words:
            continue
        if words[0] == "make":
            missing = [t for t in words[1:] if "=" not in t and t not in targets]
            assert not missing, f"{block.where}: Makefile has no target {missing}"
        elif words[0] == "halo":
            args = _synopsis_args(command)[1:]
            try:
                parser.parse_args(args)
            except (argparse.ArgumentError, SystemExit) as exc:
                pytest.fail(f"{block.where}: `{command.strip()}` does not parse (as {args}): {exc}")
        else:
            launcher = _launcher_parser(words)
            if launcher is not None:
                parser_of, args = launcher
                try:
                    parser_of.parse_args(args)
                except SystemExit as exc:
                    pytest.fail(
                        f"{block.where}: `{command.strip()}` does not parse as {words[0]} options: {exc}"
                    )
            missing = [w for w in words if _REPO_PATH.fullmatch(w) and not (ROOT / w).exists()]
            assert not missing, (
                f"{block.where}: `{command.strip()}` names files the repository lacks: {missing}"
            )


# ---- cpp and cmake -----------------------------------------------------------------------------------

CPP = [b for b in BLOCKS if b.lang == "cpp"]
CMAKE = [b for b in BLOCKS if b.lang == "cmake"]


def _program(block: Block) -> str:
    code = block.setup + "\n" + block.code
    if re.search(r"\bint\s+main\s*\(", code):
        return code
    includes = [line for line in code.split("\n") if line.lstrip().startswith("#include")]
    body = [line for line in code.split("\n") if not line.lstrip().startswith("#include")]
    return "\n".join(includes) + "\n\nint main() {\n" + "\n".join(body) + "\n  return 0;\n}\n"


def _cmake_for(block: Block) -> Block | None:
    """The cmake block right before this cpp block in the same file, if any."""
    before = [c for c in CMAKE if c.path == block.path and c.line < block.line]
    if not before:
        return None
    last = before[-1]
    between = [b for b in BLOCKS if b.path == block.path and last.line < b.line < block.line]
    return None if between else last


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory):
    if not (INSTALL / "lib" / "cmake" / "halo").is_dir():
        pytest.skip(f"{INSTALL} has no installed halo package (run `make cpp` first)")
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    src = tmp_path_factory.mktemp("docs_cpp")
    lists = [
        "cmake_minimum_required(VERSION 3.20)",
        "project(halo_docs LANGUAGES CXX)",
        "set(CMAKE_CXX_STANDARD 20)",
    ]
    targets = {}
    paired = {}
    for i, block in enumerate(CPP):
        (src / f"block{i}.cpp").write_text(_program(block))
        cmake = _cmake_for(block)
        if cmake is not None:
            paired[i] = cmake
            lists.append(f"add_executable(app block{i}.cpp)")
            lists.append(cmake.code)
            targets["app"] = block
        else:
            lists.append("find_package(halo REQUIRED)")
            lists.append(f"add_executable(block{i} block{i}.cpp)")
            lists.append(f"target_link_libraries(block{i} PRIVATE halo::halo)")
            targets[f"block{i}"] = block
    for cmake in CMAKE:
        assert any(c is cmake for c in paired.values()), (
            f"{cmake.where}: a cmake block must precede a cpp block"
        )
    (src / "CMakeLists.txt").write_text("\n".join(lists) + "\n")
    build = src / "build"
    env = dict(os.environ)
    env.pop("CMAKE_CXX_COMPILER_LAUNCHER", None)  # one-off objects: no point filling the cache
    configure = subprocess.run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build),
            "-G",
            "Ninja",
            f"-DCMAKE_PREFIX_PATH={INSTALL}",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    where = ", ".join(b.where for b in CMAKE)
    assert configure.returncode == 0, (
        f"configuring the cpp blocks (cmake blocks: {where}) failed:\n{configure.stderr}"
    )
    results = {}
    for target, block in targets.items():
        built = subprocess.run(
            ["cmake", "--build", str(build), "--target", target],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        results[block.where] = (built.returncode, built.stdout[-4000:] + built.stderr[-2000:], build / target)
    return results


@pytest.mark.parametrize("block", CPP, ids=_ids(CPP))
def test_cpp_block(block: Block, cpp_build, tmp_path: Path):
    code, log, exe = cpp_build[block.where]
    assert code == 0, f"{block.where}: does not compile against the installed package:\n{log}"
    if block.mode == "run":
        run = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, f"{block.where}: exited {run.returncode}:\n{run.stderr[-3000:]}"


def test_the_conventions_catch_a_wrong_block(tmp_path: Path, python_runner):
    """The checks fail on a wrong block, naming where it is (the parser itself is not trusted)."""
    doc = tmp_path / "x.md"
    doc.write_text("intro\n\n```python\nimport halo\nhalo.no_such_function()\n```\n\n```\nuntagged\n```\n")
    global DOCS
    saved = DOCS
    try:
        DOCS = [doc]
        found = blocks()
    finally:
        DOCS = saved
    assert [(b.line, b.lang) for b in found] == [(3, "python"), (8, "")]
    with pytest.raises(AssertionError, match=r"x\.md:3 \(run\) failed"):
        test_python_block(found[0], tmp_path, python_runner)
    bad = Block(doc, 12, "sh", "halo merge --base DIR --no-such-flag 1")
    with pytest.raises(pytest.fail.Exception, match=r"x\.md:12: `halo merge"):
        test_shell_block_commands_parse(bad)
    with pytest.raises(AssertionError, match=r"x\.md:14: .*lacks: \['examples/no_such\.py'\]"):
        test_shell_block_commands_parse(
            Block(doc, 14, "sh", "torchrun --nproc_per_node 2 examples/no_such.py")
        )
    assert _synopsis_args("halo x --dtype fp32|fp16 [--tile R C] --workers a:1,b:2,...") == [
        "halo",
        "x",
        "--dtype",
        "fp32",
        "--tile",
        "1",
        "1",
        "--workers",
        "a:1,b:2",
    ]
