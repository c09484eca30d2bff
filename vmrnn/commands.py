"""Commands as vmrnn prints them for the user to run: spelled so that they work as shown in the user's shell.

A console script of this installation (`vmrnn`, `mlflow`, `ray`) is printed bare only when the shell's PATH
finds this environment's copy (an activated venv); otherwise by its path (`.venv/bin/mlflow` for a venv in
the working directory, never activated), else as `<python> -m <module>`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys


def _display(path: str, cwd: str) -> str:
    """`path` relative to `cwd` when it lies inside it (it still holds a '/': the shell runs it as a
    path), else absolute; quoted for the shell."""
    rel = os.path.relpath(path, cwd)
    shown = rel if not rel.startswith(os.pardir) and os.sep in rel else path
    return shlex.quote(shown)


def _found_here(name: str, bin_dir: str, search_path: str | None) -> bool:
    found = shutil.which(name, path=search_path)
    try:
        return bool(found) and os.path.samefile(os.path.dirname(found), bin_dir)
    except OSError:
        return False


def python(*, executable: str | None = None, search_path: str | None = None, cwd: str | None = None) -> str:
    """This interpreter as the shell can run it: `python` when PATH's `python` is this one, else its path."""
    executable = executable or sys.executable
    bin_dir = os.path.dirname(executable)
    if _found_here("python", bin_dir, search_path):
        return "python"
    return _display(executable, cwd or os.getcwd())


def tool(
    name: str,
    module: str | None = None,
    *,
    executable: str | None = None,
    search_path: str | None = None,
    cwd: str | None = None,
) -> str:
    """Console script `name` of this environment (the one beside the running interpreter) as the shell
    can run it; `module` is its `python -m` form, used when the environment has no such script."""
    executable = executable or sys.executable
    cwd = cwd or os.getcwd()
    bin_dir = os.path.dirname(executable)
    script = os.path.join(bin_dir, name)
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return name if _found_here(name, bin_dir, search_path) else _display(script, cwd)
    if module:
        return f"{python(executable=executable, search_path=search_path, cwd=cwd)} -m {module}"
    return name


def vmrnn_command(args: str) -> str:
    """`vmrnn <args>` as the user's shell runs it (for the commands that error messages tell users to run)."""
    return f"{tool('vmrnn', 'vmrnn')} {args}"
