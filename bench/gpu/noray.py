"""Run a Python script or module with Ray, W&B and Optuna made unimportable, as on the GPU machine
(which has none of them): the no-Ray path must not need them.

    python bench/gpu/noray.py SCRIPT [ARGS ...]
    python bench/gpu/noray.py -m MODULE [ARGS ...]

`import ray` (or wandb, optuna, any submodule) then raises ImportError ("import of ray halted"),
and availability checks (`importlib.util.find_spec`) answer None, as where the package is missing.
An attempt that some code catches and swallows is still reported: every `import` statement of a
blocked name made by ftcluster's or the benchmarks' own code is printed to stderr at exit as
"no-ray violation: MODULE imports NAME" and, when FTC_NORAY_REPORT names a file, appended to it as
a JSON line. Imports made by third-party libraries (their optional integrations) are not listed.
FTC_NORAY_ALSO (comma-separated) blocks more packages the same way: run.sh blocks deepspeed and gguf,
which it does not install on the GPU machine, so its CPU rehearsal sees what that machine will.
"""

from __future__ import annotations

import atexit
import builtins
import json
import os
import runpy
import sys

BLOCKED = ("ray", "wandb", "optuna", *filter(None, os.environ.get("FTC_NORAY_ALSO", "").split(",")))
OWN_CODE = ("ftcluster", "__main__", "conftest", "test_", "gpu_throughput", "planner_memory", "train_check")

violations: list[dict] = []


def block() -> None:
    for name in BLOCKED:
        loaded = [key for key in sys.modules if key == name or key.startswith(name + ".")]
        if loaded:
            raise SystemExit(f"noray: {loaded[0]} is already imported")
        sys.modules[name] = None  # type: ignore[assignment]  # import -> ImportError; find_spec -> None

    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] in BLOCKED:
            importer = (globals or {}).get("__name__", "?")
            if importer.split(".")[0].startswith(OWN_CODE):
                violations.append({"importer": importer, "name": name})
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import


def report() -> None:
    seen = []
    for item in violations:
        if item not in seen:
            seen.append(item)
            print(f"no-ray violation: {item['importer']} imports {item['name']}", file=sys.stderr, flush=True)
    path = os.environ.get("FTC_NORAY_REPORT")
    if path and seen:
        with open(path, "a") as handle:
            for item in seen:
                handle.write(json.dumps(item) + "\n")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    block()
    atexit.register(report)
    if sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script = sys.argv[1]
        sys.argv = sys.argv[1:]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
