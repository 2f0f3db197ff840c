"""Run a module's ``main()`` in-process and get its result dict (exit or fail)."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import pytest
from ansible.module_utils import basic


class ModuleExit(Exception):
    def __init__(self, result: dict, failed: bool) -> None:
        super().__init__(result.get("msg", ""))
        self.result = result
        self.failed = failed


@contextlib.contextmanager
def _module_args(args: dict):
    try:  # ansible-core >= 2.19
        from ansible.module_utils.testing import patch_module_args
    except ImportError:  # 2.16 - 2.18
        payload = json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode()
        with mock.patch.object(basic, "_ANSIBLE_ARGS", payload):
            yield
        return
    with patch_module_args(args):
        yield


def _exit(self, **kwargs):  # noqa: ANN001
    kwargs.setdefault("changed", False)
    raise ModuleExit(kwargs, failed=False)


def _fail(self, msg, **kwargs):  # noqa: ANN001
    kwargs["msg"] = msg
    kwargs["failed"] = True
    raise ModuleExit(kwargs, failed=True)


@pytest.fixture
def run_module():
    """run_module(mod, args, check=False, diff=False) -> result dict ('failed' on failure)."""

    def run(mod, args: dict, check: bool = False, diff: bool = False) -> dict:
        full = dict(args, _ansible_check_mode=check, _ansible_diff=diff)
        with _module_args(full), \
                mock.patch.object(basic.AnsibleModule, "exit_json", _exit), \
                mock.patch.object(basic.AnsibleModule, "fail_json", _fail), \
                pytest.raises(ModuleExit) as info:
            mod.main()
        return info.value.result

    return run
