"""The store box's install is lean: the agent's runtime loads none of the extras, and a
command that needs a missing extra says which one to install instead of a traceback.

"Missing" is made real for one subprocess by a ``None`` entry in ``sys.modules`` (Python's
own way to make an import fail with ``ModuleNotFoundError``); the project's code is
untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
# The top-level modules of each extra's packages (pyproject.toml [project.optional-dependencies]).
EXTRA_MODULES = {
    "train": ("onnx", "matplotlib"),
    "demo": ("amqtt",),
    "store": ("psycopg", "psycopg_pool"),
    "awscrt": ("awscrt",),  # the faster MQTT client, opt-in: picked at run time when installed
    "dev": ("sqlite_utils",),  # the buffer's schema is its own SQL (memory, issue 11)
}
# What a store box runs: the service, its CLI, the serial bridge, the uploader, the model.
RUNTIME_MODULES = (
    "edge_agent.app",
    "edge_agent.cli",
    "edge_agent.personalize.personalizer",
    "edge_agent.preflight",
    "firmware_bridge.serial_source",
    "cloud_sync.uploader",
    "models",
)


def _python(
    code: str, *, block: tuple[str, ...] = (), cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in block)
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_runtime_imports_none_of_the_extras() -> None:
    imports = "".join(f"import {module}\n" for module in RUNTIME_MODULES)
    listed = _python(imports + "import json; print(json.dumps(sorted(sys.modules)))")
    assert listed.returncode == 0, listed.stderr
    loaded = set(json.loads(listed.stdout))
    assert "models.numpy_runtime" in loaded  # the model runtime is the agent's own
    assert "onnxruntime" not in loaded  # a base dependency, imported only when a model needs it
    for extra, modules in EXTRA_MODULES.items():
        for module in modules:
            found = sorted(m for m in loaded if m == module or m.startswith(module + "."))
            assert found == [], f"{module} ([{extra}]) is loaded by the runtime: {found[:5]}"


def test_the_runtime_starts_without_any_extra() -> None:
    blocked = tuple(module for modules in EXTRA_MODULES.values() for module in modules)
    imports = "".join(f"import {module}\n" for module in RUNTIME_MODULES)
    ran = _python(
        imports + "from edge_agent.cli import main; sys.exit(main(['--version']))", block=blocked
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "0.1.0"


def test_extras_are_declared_and_dev_holds_them_all() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {Requirement(text).name for text in project["dependencies"]}
    extras = {
        extra: {Requirement(text).name for text in requirements}
        for extra, requirements in project["optional-dependencies"].items()
    }
    for extra, names in {
        "train": ("onnx", "matplotlib"),
        "demo": ("amqtt",),
        "store": ("psycopg", "nats-py"),
        "nats": ("nats-py",),  # sync.transport = "nats" on a store box
        "awscrt": ("awscrt",),  # 13 MB: a store box's venv stays within 200 MB without it
        "dev": ("sqlite-utils",),
    }.items():
        for name in names:
            assert name not in base
            assert name in extras[extra]
    assert "edge-agent[train,demo,store,nats,awscrt]" in project["optional-dependencies"]["dev"]


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (
            "store",
            "from cloud_sync.store.cli import main\n"
            "sys.exit(main(['stats', '--db', 'postgresql://127.0.0.1:1/none']))",
        ),
        (
            "train",
            "from models.cli import main\n"
            "sys.exit(main(['train', '--events', 'missing.jsonl', '--out', 'model']))",
        ),
        (
            "demo",
            "from edge_agent.cli import main\n"
            "sys.exit(main(['demo', '--duration', '1', '--http-port', '0', '--no-sync',"
            " '--no-serial']))",
        ),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(extra: str, code: str, tmp_path: Path) -> None:
    ran = _python(code, block=EXTRA_MODULES[extra], cwd=tmp_path)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert f"pip install 'edge-agent[{extra}]'" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_a_plot_without_matplotlib_names_the_train_extra(tmp_path: Path) -> None:
    ran = _python(
        "from pathlib import Path\nfrom models.errors import MissingExtraError\n"
        "from models.plot import plot_hit_rates\n"
        "try:\n    plot_hit_rates({'model': [0.5]}, Path('plot.png'))\n"
        "except MissingExtraError as exc:\n    print(exc)\n",
        block=("matplotlib",),
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    assert "pip install 'edge-agent[train]'" in ran.stdout
    assert not (tmp_path / "plot.png").exists()
