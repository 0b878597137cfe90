"""The role engine: Ansible-format roles run natively over one SSH connection.

    validate(["kernel"], roles_path)                      # no connection; RoleError with file:line
    recap = run_roles(conn, ["kernel"], roles_path, {"x": 1}, check=True, diff=True, reporter=TextReporter())
"""

from machine.roles.executor import run_roles
from machine.roles.loader import Role, load_role, validate
from machine.roles.report import Failure, Recap, Reporter, TaskInfo, TaskResult, TextReporter
from machine.roles.yamlload import RoleError

__all__ = [
    "Failure", "Recap", "Reporter", "Role", "RoleError", "TaskInfo", "TaskResult", "TextReporter", "load_role",
    "run_roles", "validate",
]
