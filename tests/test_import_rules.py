"""The architecture, checked from the import graph: one namespace, imports in one direction.

core <- orchestration (the producer, never torch)   core <- tasks (Celery) -> workers (compute)
Every module of a side is imported in one fresh interpreter and what they loaded is compared with
what the side may load (each alone, to name the culprit, when that finds something); a fresh wheel
of the project is checked for what it installs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"core": "clipbatch.core", "orchestration": "clipbatch.orchestration", "tasks": "clipbatch.tasks",
           "workers": "clipbatch.workers"}
# what each side must never load, by module-name prefix
FORBIDDEN = {
    "core": ("clipbatch.orchestration", "clipbatch.tasks", "clipbatch.workers", "torch", "open_clip"),
    "orchestration": ("clipbatch.tasks", "clipbatch.workers", "torch", "open_clip"),
    "tasks": ("clipbatch.orchestration",),
    "workers": ("clipbatch.orchestration", "clipbatch.tasks", "celery", "kombu", "redis", "boto3", "botocore"),
}


def modules_of(folder: str) -> list[str]:
    return sorted(f"{FOLDERS[folder]}.{p.stem}" if p.stem != "__init__" else FOLDERS[folder]
                  for p in (ROOT / folder).glob("*.py"))


def loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/").stdout
    return set(json.loads(out.splitlines()[-1]))


def forbidden(folder: str, loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if m.startswith(FORBIDDEN[folder]) and m.split(".")[0] != "_")


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_each_module_loads_only_what_its_side_may(folder):
    modules = modules_of(folder)
    assert len(modules) > 1
    # What the side's modules load together is what each loads alone, put together: one interpreter
    # (one torch import) proves the rule for all of them; a module alone is imported only to name it.
    together = forbidden(folder, loaded_by("; ".join(f"import {m}" for m in modules)))
    if together:
        for module in modules:
            bad = forbidden(folder, loaded_by(f"import {module}"))
            assert not bad, f"{module} loads {bad[:8]}"
    assert not together, f"{folder}'s modules load {together[:8]} together, none alone"


def test_producer_commands_never_load_the_worker_side():
    # when: the whole command is built and a producer command's help is printed
    loaded = loaded_by(
        "from clipbatch.cli import main; "
        "[main(args, standalone_mode=False) for args in (['submit', 'embed', '--help'], ['status', '--help'])]"
    )
    # then: neither torch nor the Celery task modules were imported
    assert not {m for m in loaded if m.startswith(("torch", "open_clip", "clipbatch.tasks", "clipbatch.workers"))}


def test_a_training_shard_task_loads_no_torch_to_get_its_result_type():
    # given: the write stage of a curation job, which copies bytes and runs no model
    loaded = loaded_by("import clipbatch.tasks.training_shards")
    # then: its ShardResult comes from the core, not from the embedding compute
    assert not {m for m in loaded if m.startswith(("torch", "open_clip"))}


def test_a_fresh_install_exposes_only_the_clipbatch_namespace_and_command(tmp_path):
    # given: a wheel built from the checkout, as pip builds it for any install
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("clipbatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()

    # then: every file lives under clipbatch/ or the dist-info, the folders map into the namespace
    assert {n.split("/")[0] for n in names} == {"clipbatch", wheel.name.split("-py")[0] + ".dist-info"}
    for folder, package in FOLDERS.items():
        assert f"{package.replace('.', '/')}/__init__.py" in names, folder
    assert "clipbatch/workers/model_configs/clipbatch-tiny.json" in names
    # and the only command is clipbatch
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert entry_points.split() == ["[console_scripts]", "clipbatch", "=", "clipbatch.cli:main"]


def test_only_json_on_the_wire():
    from clipbatch.core.broker import make_app

    conf = make_app().conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    vt = conf.broker_transport_options["visibility_timeout"]
    assert conf.result_backend_transport_options["visibility_timeout"] == vt
