"""Who may do what: roles, and an access policy that casbin decides.

The policy is a casbin CSV file (params `governance.policy`, default governance/policy.csv) of
two kinds of line:

    p, <role>, <object>, <action>     a role may do an action on objects matching a pattern (`*` globs)
    g, <identity>, <role>             an identity holds a role (roles may hold roles)

Identities are what the environment already says (`llmops.governance.identity`): a person or service on the
CLI, `key:<name>` for an API key at the server. An identity the policy does not name holds
`governance.default_role` (a key: `governance.default_key_role`).

Objects and actions, checked where each action is done (so every path to it is checked: the
CLI, a Prefect flow, the UI's approval form):

    *                   read       what a viewer does; advisory (git and the DVC remote's own permissions
                                   govern who can read them)
    pipeline            run        run the pipeline or a stage (`llmops run`, `dvc repro`, the monitor)
    registry            register   register a release as a version
    stage:<stage>       promote    give a version a stage by hand
    stage:<stage>       rollback   give a stage back to its previous holder
    stage:production    approve    approve or reject a release waiting for review
    stage:production    deploy     the pipeline's own promotion of what its gate passed (and, with
                                   deploy.require_approval, a reviewer approved)
    data                erase      a GDPR erasure (`llmops erase`)
    keys                manage     make and revoke API keys
    servers             operate    stop or reload the project's running servers (`llmops serve stop|reload`)
    feedback            review     accept or reject a flagged answer's correction (`llmops feedback accept|reject`):
                                   an accepted one becomes training data
    policy              change     change the access policy (governance/policy.csv): `llmops trail verify`
                                   names every change to the file that no `policy.change` record covers
    model:<name>        call       call a served model (the server, per API key)

A refusal names who, what and the roles that may, exits non-zero (403 at the server), and is
audited with outcome `denied`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmops.core.errors import LlmopsError

ACTIONS = {"read", "run", "register", "promote", "rollback", "approve", "deploy", "erase", "manage", "call", "operate",
           "review", "change"}
_MODEL = """
[request_definition]
r = sub, obj, act
[policy_definition]
p = sub, obj, act
[role_definition]
g = _, _
[policy_effect]
e = some(where (p.eft == allow))
[matchers]
m = g(r.sub, p.sub) && keyMatch(r.obj, p.obj) && (r.act == p.act || p.act == "*")
"""


class AccessDenied(LlmopsError):
    """The identity's roles do not allow the action; nothing was done."""


class PolicyError(LlmopsError):
    """The access policy cannot be used (a missing file, an unknown role or action); the message names it."""


@dataclass(frozen=True)
class Policy:
    path: Path
    enforcer: object  # casbin.Enforcer
    roles: frozenset[str]  # the roles that some `p` line gives a permission
    default_role: str
    default_key_role: str

    def roles_of(self, who: str) -> list[str]:
        """The roles the policy gives `who` (not those they inherit), or the default role."""
        held = self.enforcer.get_roles_for_user(who)
        return held or [self.default_key_role if who.startswith("key:") else self.default_role]

    def allows(self, who: str, action: str, object: str) -> bool:
        if action not in ACTIONS:
            raise PolicyError(f"unknown action {action!r}; actions are {', '.join(sorted(ACTIONS))}")
        return any(self.enforcer.enforce(role, object, action) for role in {who, *self.roles_of(who)})

    def require(self, who: str, action: str, object: str) -> None:
        """Raises AccessDenied, naming who, the roles held and the roles that may."""
        if self.allows(who, action, object):
            return
        may = sorted(r for r in self.roles if self.enforcer.enforce(r, object, action))
        raise AccessDenied(f"{who} (role {', '.join(self.roles_of(who))}) may not {action} {object}: the access "
                           f"policy {self.path} gives that to {', '.join(may) or 'no role'}")


def load(root: str | os.PathLike) -> Policy:
    """The project's policy, checked: every role it assigns, and the default roles, exist.

    Raises:
        PolicyError: the file is missing or names an unknown role or action (the line is named).
    """
    params = _governance(root)
    return _from_file(path_of(root), params.default_role, params.default_key_role)


def path_of(root: str | os.PathLike) -> Path:
    """The project's policy file (governance.policy).

    Raises:
        PolicyError: params.yaml cannot be read.
    """
    policy = _governance(root).policy
    return Path(policy) if Path(policy).is_absolute() else Path(root) / policy


def _governance(root: str | os.PathLike):
    from llmops.core.config import PARAMS_FILE, ConfigError, load_params

    try:
        return load_params(Path(root) / PARAMS_FILE).governance
    except ConfigError as exc:
        raise PolicyError(str(exc)) from None


def as_recorded(root: str | os.PathLike, text: str) -> Policy:
    """The policy whose file held `text` (as an audit record keeps it), under the project's default roles.

    Raises:
        PolicyError: the text is no valid policy.
    """
    import tempfile

    params = _governance(root)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "policy.csv").write_text(text)
        return _from_file(Path(tmp) / "policy.csv", params.default_role, params.default_key_role)


def _from_file(path: Path, default_role: str, default_key_role: str) -> Policy:
    import casbin
    from casbin.persist.adapters import FileAdapter

    if not path.is_file():
        raise PolicyError(f"governance.policy: {path}: no such file (the access policy: `p, role, object, action` "
                          "and `g, identity, role` lines)")
    lines = [(n, [f.strip() for f in line.split("#")[0].split(",")]) for n, line in
             enumerate(path.read_text().splitlines(), 1) if line.split("#")[0].strip()]
    roles = {fields[1] for _, fields in lines if fields[0] == "p" and len(fields) == 4}
    for number, fields in lines:
        where = f"{path}:{number}"
        if fields[0] == "p" and len(fields) == 4:
            if fields[3] != "*" and fields[3] not in ACTIONS:
                raise PolicyError(f"{where}: unknown action {fields[3]!r}; actions are {', '.join(sorted(ACTIONS))}")
        elif fields[0] == "g" and len(fields) == 3:
            if fields[2] not in roles:  # a role is what a `p` line gives permissions to
                raise PolicyError(f"{where}: unknown role {fields[2]!r}; the policy's roles are "
                                  f"{', '.join(sorted(roles))}")
        else:
            raise PolicyError(f"{where}: expected `p, role, object, action` or `g, identity, role`")
    for key, role in (("default_role", default_role), ("default_key_role", default_key_role)):
        if role not in roles:
            raise PolicyError(f"governance.{key}: unknown role {role!r}; {path} defines {', '.join(sorted(roles))}")
    model = casbin.Model()
    model.load_model_from_text(_MODEL)
    enforcer = casbin.Enforcer(model, FileAdapter(str(path)))
    return Policy(path=path, enforcer=enforcer, roles=frozenset(roles), default_role=default_role,
                  default_key_role=default_key_role)
