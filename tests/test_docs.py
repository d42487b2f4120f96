"""The documentation: README.md and docs/ (the site `./dev docs` builds).

- The strict site build passes (a broken link or anchor, a missing reference,
  a public name without a docstring fail it: mkdocs.yml, docs/hooks.py).
- Every fenced ``python`` and ``bash`` block of README.md and docs/ (and of the
  files docs/ includes with ``--8<--``) either runs here, or is preceded by
  ``<!-- not-run: REASON -->`` on the line right above it (above the include
  line for an included file). The Python blocks run in one process (one
  TensorFlow import) on tiny data, each in a fresh namespace made from the
  PREAMBLE below (the names the snippets take as given: ``x``, ``y``,
  ``build_model``, ``dataset``, ...), in a scratch directory holding a
  ``model.keras`` saved with ShardedAdam. The bash blocks run from the
  repository root with this interpreter's bin/ first on PATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash", "console": "bash"}
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!-- (?P<kind>not-run|run): (?P<reason>.*?) -->\s*$")
INCLUDE = re.compile(r'^\s*--8<--\s+"(?P<path>[^":]+)(?::[^"]*)?"\s*$')


@dataclass
class Block:
    where: str          # file:line of the opening fence
    lang: str           # "python" or "bash"
    code: str
    not_run: str | None  # the reason, when marked


def _marker_above(lines, index):
    """The marker on the line right above ``lines[index]``, if any."""
    if index == 0:
        return None
    m = MARKER.match(lines[index - 1])
    return m


def blocks_of(path: Path, inherited_reason: str | None = None, label: str | None = None) -> list[Block]:
    lines = path.read_text().splitlines()
    label = label or str(path.relative_to(ROOT))
    found, i = [], 0
    while i < len(lines):
        include = INCLUDE.match(lines[i])
        if include:
            marker = _marker_above(lines, i)
            reason = marker.group("reason") if marker and marker.group("kind") == "not-run" else inherited_reason
            target = ROOT / include.group("path")
            found += blocks_of(target, reason, f"{label}:{i + 1} -> {include.group('path')}")
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, indent = i, len(fence.group("indent"))
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # the closing fence
        lang = LANGUAGES.get(fence.group("lang").lower())
        if lang is None:
            continue  # text, yaml, ...: not a program
        marker = _marker_above(lines, start)
        reason = inherited_reason
        if marker and marker.group("kind") == "not-run":
            reason = marker.group("reason")
        found.append(Block(f"{label}:{start + 1}", lang, "\n".join(body) + "\n", reason))
    return found


def all_blocks() -> list[Block]:
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [b for page in pages for b in blocks_of(page)]


BLOCKS = all_blocks()


def test_every_marker_has_a_reason_and_a_block():
    """A `not-run` marker names why, and sits right above a block or an include."""
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines):
            m = MARKER.match(line)
            if not m:
                continue
            where = f"{page.relative_to(ROOT)}:{n + 1}"
            assert len(m.group("reason").strip()) >= 10, f"{where}: say why the block is not run"
            below = lines[n + 1] if n + 1 < len(lines) else ""
            assert FENCE.match(below) or INCLUDE.match(below), \
                f"{where}: the marker must be on the line right above a ``` fence or a --8<-- include"


def test_the_snippet_inventory():
    """Blocks are found (the parser works), and the front page's runnable ones run."""
    readme = [b for b in BLOCKS if b.where.startswith("README.md")]
    assert len(readme) >= 4
    assert any(b.not_run is None and b.lang == "python" for b in readme)
    # The two set-up commands stay on the front page with their meaning.
    setup = next(b for b in readme if "./dev main" in b.code)
    assert "./dev test" in setup.code


PREAMBLE = textwrap.dedent("""\
    # The names the documentation's snippets take as given, made small.
    import os
    import numpy as np
    import keras
    import tensorflow as tf
    import distadam

    keras.utils.set_random_seed(0)
    tf.config.run_functions_eagerly(True)   # no tracing: the snippets are checked for what they call, not for speed
    x = np.random.rand(64, 8).astype("float32")
    y = np.random.rand(64, 1).astype("float32")
    global_batch = 32

    def build_model():
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])

    make_model = build_model
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
    train_ds = val_ds = dataset
    strategy = tf.distribute.get_strategy()
    total_steps = 100           # the checkpoint loop saves once, at step 100

    def train_step(*args, **kwargs):
        "A stand-in for the reader's step."
    """)

RUNNER = textwrap.dedent("""\
    import contextlib, io, json, os, sys, traceback
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    blocks = json.loads(sys.stdin.read())
    preamble = {"__name__": "__docs__"}
    exec(compile(blocks["preamble"], "preamble", "exec"), preamble)
    # A model file saved with ShardedAdam, for the snippets that load one.
    m = preamble["build_model"]()
    m.compile(optimizer=preamble["distadam"].ShardedAdam(1e-3), loss="mse")
    m.optimizer.build(m.trainable_variables)
    m.save("model.keras")
    results = []
    for where, code in blocks["blocks"]:
        namespace = dict(preamble)
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, where, "exec"), namespace)
            results.append([where, None])
        except BaseException:
            results.append([where, traceback.format_exc()[-3000:] + out.getvalue()[-1000:]])
    print("RESULTS", json.dumps(results))
    """)


def test_python_snippets_run(tmp_path):
    by_code = {}  # a snippet shown on two pages (README.md and the site) runs once
    for b in BLOCKS:
        if b.lang == "python" and b.not_run is None:
            by_code.setdefault(b.code, []).append(b.where)
    blocks = [(" and ".join(wheres), code) for code, wheres in by_code.items()]
    assert blocks
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps({"preamble": PREAMBLE, "blocks": blocks}),
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert "RESULTS" in proc.stdout, proc.stderr[-4000:]
    results = json.loads(proc.stdout.rsplit("RESULTS", 1)[1])
    failed = {where: error for where, error in results if error}
    assert not failed, "\n\n".join(f"{where}:\n{error}" for where, error in failed.items())
    assert len(results) == len(blocks)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash" and b.not_run is None],
                         ids=lambda b: b.where)
def test_bash_snippets_run(block):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{block.where}:\n{block.code}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def test_strict_site_build(tmp_path):
    """What `./dev docs` runs, into a scratch directory."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    site = tmp_path / "site"
    cli = (site / "reference" / "cli.html").read_text()
    for flag in ("--nproc", "--restarts", "--workers", "--node-type"):  # the generated --help texts
        assert flag in cli, flag
    assert (site / "benchmarks" / "results" / "step_time_ratio.png").exists()
    api = (site / "reference" / "optimizers.html").read_text()
    assert "shard_group_size" in api and "state_bytes_per_device" in api


def test_the_docstring_check_catches_a_missing_docstring(tmp_path):
    """docs/hooks.py's check, on a package with one undocumented method."""
    griffe = pytest.importorskip("griffe")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "mod.py").write_text(textwrap.dedent('''\
        """A module."""
        class Public:
            """Documented."""
            def documented(self):
                """Yes."""
            def undocumented(self):
                pass
            def _private(self):
                pass
        '''))
    spec = importlib.util.spec_from_file_location("distadam_docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    loaded = griffe.load("pkg", search_paths=[str(tmp_path)], resolve_aliases=False)
    assert hooks._undocumented(loaded["mod.Public"], "pkg.mod.Public") == ["pkg.mod.Public.undocumented"]
