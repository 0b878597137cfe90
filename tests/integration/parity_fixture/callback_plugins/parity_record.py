"""Appends each task result of an ansible-playbook run to $PARITY_RECORD as JSON lines ({task, item, status}),
for tests/integration/test_ansible_parity.py (ansible-core ships no JSON callback)."""

import json
import os

from ansible.plugins.callback import CallbackBase

FACTS = {"gather_facts", "setup", "ansible.builtin.gather_facts", "ansible.builtin.setup"}


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "parity_record"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result, status, item=False):
        if result._task.action in FACTS:
            return
        if not item and "results" in result._result:
            return  # a loop's summary: its items were recorded one by one
        label = str(result._result.get("_ansible_item_label", result._result.get("item"))) if item else None
        with open(os.environ["PARITY_RECORD"], "a") as out:
            out.write(json.dumps({"task": result._task.get_name(), "item": label, "status": status}) + "\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "changed" if result._result.get("changed") else "ok")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_item_on_ok(self, result):
        self._record(result, "changed" if result._result.get("changed") else "ok", item=True)

    def v2_runner_item_on_skipped(self, result):
        self._record(result, "skipped", item=True)

    def v2_runner_item_on_failed(self, result):
        self._record(result, "failed", item=True)
