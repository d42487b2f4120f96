"""mkdocs hooks for the distadam site (mkdocs.yml names this file).

What the pages show that must not drift from the code is made at build time:

- ``<!-- cli-help: ARGS -->`` becomes the output of ``python -m distadam ARGS``
  (e.g. ``--help``, ``launch --help``, ``plan --help``);
- ``<!-- plan-table -->`` becomes the table ``benchmarks/plan_table.py`` prints
  (the same one tests/test_cost_model.py keeps README.md in step with);
- the plots in ``benchmarks/results/`` are published at
  ``benchmarks/results/`` of the site, where the benchmark pages link them.

And the build fails (a warning, which ``--strict`` turns into an error) when a
name the API reference documents, or one of its public members, has no
docstring, or when a name in ``distadam.__all__`` has no reference entry.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("mkdocs.hooks.distadam")

CLI_HELP = re.compile(r"^<!-- cli-help: (?P<args>[^>]*?) -->$", re.M)
PLAN_TABLE = "<!-- plan-table -->"
REFERENCE = re.compile(r"^::: (?P<name>[\w.]+)", re.M)
PLOTS = ROOT / "benchmarks" / "results"

_documented: set[str] = set()


def cli_help(args: str) -> str:
    """``python -m distadam ARGS`` as this checkout prints it (no TensorFlow)."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "distadam", *args.split()], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)
    if proc.returncode != 0:
        log.warning("`python -m distadam %s` exited %s: %s", args, proc.returncode, proc.stderr[-1000:])
    return f"```text\n$ distadam {args}\n{proc.stdout.rstrip()}\n```"


def plan_table() -> str:
    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "benchmarks" / "plan_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.table()


def on_files(files, config):
    for plot in sorted(PLOTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{plot.name}", abs_src_path=str(plot)))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = CLI_HELP.sub(lambda m: cli_help(m.group("args")), markdown)
    if PLAN_TABLE in markdown:
        markdown = markdown.replace(PLAN_TABLE, plan_table())
    _documented.update(m.group("name") for m in REFERENCE.finditer(markdown))
    return markdown


def _undocumented(obj, path):
    """Names under ``obj`` (itself, its public members) without a docstring."""
    import griffe

    missing = []
    if not obj.docstring or not obj.docstring.value.strip():
        missing.append(path)
    if obj.kind in (griffe.Kind.CLASS, griffe.Kind.MODULE):
        for name, member in obj.members.items():
            if name.startswith("_") or member.is_alias or not member.is_public:
                continue
            if member.kind in (griffe.Kind.FUNCTION, griffe.Kind.CLASS):
                missing += _undocumented(member, f"{path}.{name}")
    return missing


def on_post_build(config):
    import griffe

    package = griffe.load("distadam", search_paths=[str(ROOT)], resolve_aliases=False)
    for name in sorted(_documented):
        try:
            obj = package[name.removeprefix("distadam.")] if name != "distadam" else package
        except KeyError:
            log.warning("the API reference names %s, which griffe cannot find", name)
            continue
        for path in _undocumented(obj, name):
            log.warning("public name without a docstring: %s", path)
    # Every name `from distadam import *` gives has a reference entry.
    documented_tails = {name.rsplit(".", 1)[-1] for name in _documented}
    for name in package.exports or ():
        if not name.startswith("_") and name not in documented_tails:
            log.warning("distadam.%s is public (distadam.__all__) but not in the API reference", name)
