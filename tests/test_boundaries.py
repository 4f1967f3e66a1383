"""The producer side runs on a small box without a GPU stack."""
from __future__ import annotations

import subprocess
import sys


def test_producer_imports_without_torch():
    code = (
        "import orchestration, sys; assert 'torch' not in sys.modules;"
        "import orchestration.cli, orchestration.embedded, tasks.app, tasks.specs; "
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_json_on_the_wire():
    from tasks.app import make_app

    conf = make_app().conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    vt = conf.broker_transport_options["visibility_timeout"]
    assert conf.result_backend_transport_options["visibility_timeout"] == vt
