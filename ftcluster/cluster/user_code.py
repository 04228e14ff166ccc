"""The user's own Python code a job spec names as `module:function` (today: GRPO reward functions), and
what of it travels with a submitted job or a rendered ConfigMap: the cluster cannot see this machine's
folders.

Each module is located with `importlib.util.find_spec` on its top-level name only, which finds it
without running it (importing a user's module here could do anything). ftcluster itself, the standard
library and installed packages come from the cluster's image; a module in a local folder (one .py file,
or a package folder) travels, and `import my_rewards` works on the cluster as it does here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path, PurePosixPath

from ftcluster.config.spec import JobSpec
from ftcluster.core.errors import FtError
from ftcluster.core.locations import looks_secret
from ftcluster.objectives.grpo.rewards import code_folders

INSTALLED_FOLDERS = ("site-packages", "dist-packages")


def named_code(spec: JobSpec) -> list[tuple[str, str]]:
    """(spec key, module:function) for every field that names the user's code; a new such field is one
    line here."""
    rewards = spec.method.grpo.rewards if spec.method.grpo else []
    return [(f"method.grpo.rewards[{index}].function", reward.function) for index, reward in enumerate(rewards)]


@dataclass
class LocalModule:
    """A module of the user's that travels: one file, or a package folder."""

    name: str  # its top-level name: my_rewards for my_rewards:f, my_pkg for my_pkg.scoring:f
    key: str  # the first spec key that names it, for errors
    source: Path  # my_rewards.py, or the package's folder

    @property
    def entry(self) -> str:
        """What it adds at the root of the job's folder (the working directory, the mount)."""
        return self.source.name

    def files(self) -> list[tuple[Path, PurePosixPath]]:
        """Each file that travels and its path under that root. A package folder travels without
        __pycache__, *.pyc and dot-folders; a credentials-like file, or a link that leads out of the
        folder, is refused."""
        if self.source.is_file():
            _refuse_secret(self.key, self.source)
            return [(self.source, PurePosixPath(self.entry))]
        root, shipped = self.source.resolve(), []
        for top, folders, names in os.walk(self.source, followlinks=True):
            here = Path(top)
            folders[:] = sorted(name for name in folders if _kept_folder(self.key, here / name, root))
            for name in sorted(names):
                if not name.endswith(".pyc"):
                    _refuse_secret(self.key, here / name)
                    _refuse_link_out(self.key, here / name, root)
                    shipped.append((here / name, PurePosixPath(self.entry, (here / name).relative_to(self.source))))
        return shipped


@dataclass
class UserCode:
    local: list[LocalModule]  # to ship
    notes: list[str]  # installed modules the cluster's image must have too


def find_user_code(spec: JobSpec) -> UserCode:
    """Where each module the spec names lives here. A module that cannot be found is refused (every one
    at once, each with its key): it could not be imported on the cluster either."""
    local: dict[str, LocalModule] = {}
    notes, problems = [], []
    for key, function in named_code(spec):
        name = function.partition(":")[0].split(".")[0]
        if name == "ftcluster" or name in sys.stdlib_module_names or name in local:
            continue
        found = locate(name)
        if found is None:
            problems.append(f"{key}: module {name} is not importable from here; run ftcluster from the folder that "
                            f"holds {name}.py (or its package folder {name}/), or install it")
            continue
        places = module_places(found)
        if any(part in INSTALLED_FOLDERS for place in places for part in place.parts):
            notes.append(f"{key}: {name} is installed here ({places[0]}), not shipped: the cluster's image must "
                         "have it installed too")
        elif len(places) > 1:
            problems.append(f"{key}: {name} is a namespace package spread over {len(places)} folders "
                            f"({', '.join(map(str, places))}); keep it in one folder to ship it")
        elif places:  # (none: built into Python)
            local[name] = LocalModule(name, key, places[0])
    if problems:
        raise FtError("\n".join(problems))
    return UserCode(list(local.values()), list(dict.fromkeys(notes)))


def locate(name: str) -> ModuleSpec | None:
    """Where `import name` finds a top-level module, searched as the reward loader searches (the Python
    path, then the current folder and the launcher's code folders); found, never executed."""
    importlib.invalidate_caches()  # folders' listings are cached: the module may be newer than that
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a module already here without a spec (__main__), a broken finder
        found = None
    return found or PathFinder.find_spec(name, code_folders())


def module_places(found: ModuleSpec) -> list[Path]:
    """A package's folders (several for a namespace package), a module's one file, or none (built in)."""
    if found.submodule_search_locations is not None:  # (the same folder may be on the path more than once)
        return list(dict.fromkeys(Path(place).resolve() for place in found.submodule_search_locations))
    return [Path(found.origin)] if found.has_location and found.origin else []


def _kept_folder(key: str, folder: Path, root: Path) -> bool:
    """Whether a package's subfolder travels: not __pycache__ or a dot-folder, nor a link back up the
    tree (a loop); a link out of the package is refused."""
    if folder.name == "__pycache__" or folder.name.startswith("."):
        return False
    _refuse_link_out(key, folder, root)
    return not folder.parent.resolve().is_relative_to(folder.resolve())


def _refuse_secret(key: str, path: Path) -> None:
    if looks_secret(path) or looks_secret(path.resolve()):
        raise FtError(f"{key}: {path} looks like a credentials file; it is never uploaded (move it out of the "
                      "code's folder)")


def _refuse_link_out(key: str, path: Path, root: Path) -> None:
    if not path.exists():
        raise FtError(f"{key}: {path} is a broken link; remove it or point it at a file in {root}")
    if not path.resolve().is_relative_to(root):
        raise FtError(f"{key}: {path} is a link to {path.resolve()}, outside {root}; links that leave the code's "
                      "folder are never uploaded (copy the file in if it belongs there)")
