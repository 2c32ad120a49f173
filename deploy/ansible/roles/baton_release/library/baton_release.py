#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: the baton authors. Licensed as baton is (MIT OR Apache-2.0).
"""Ansible module: install a release on the host's baton, or revert it."""

from __future__ import annotations

import json
import subprocess

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: baton_release
short_description: Install a release on the host's baton and report baton's verdict
description:
  - With O(state=permanent), adds the release to the store of the baton running on the
    host (C(baton release add)) and installs it (C(baton release install --wait)). That
    returns once the release is permanent (its probation passed) or once baton rolled it
    back or reverted it. The task fails with baton's reason unless the release became
    permanent. Nothing changes when it is permanent already.
  - With O(state=reverted), rolls the host back from O(version) to its previous permanent
    release (C(baton release rollback --wait)) if the host runs O(version), on probation
    or permanent. A host that does not run it is left alone.
  - Supports check mode: it reports what it would do and changes nothing.
options:
  version:
    description: The release, as named in the store.
    required: true
    type: str
  state:
    description: V(permanent) installs O(version); V(reverted) rolls it back.
    choices: [permanent, reverted]
    default: permanent
    type: str
  src:
    description:
      - The release on the host, a directory or one binary, added to the store when the
        store does not have O(version) yet.
    type: path
  program:
    description: The program inside the release (C(--program)), e.g. C(bin/app).
    type: str
  control:
    description: The baton's control socket; baton's default when unset.
    type: path
  baton:
    description: The baton executable.
    type: path
    default: baton
  timeout:
    description: Seconds to wait for baton's verdict, probation included.
    type: int
    default: 600
"""

RETURN = r"""
version: {description: The release acted on., type: str, returned: always}
permanent: {description: The permanent release after the task., type: str, returned: always}
previous: {description: The permanent release before the task., type: str, returned: always}
result: {description: baton's result (permanent, reverted, rolled_back, ...)., type: str, returned: when baton was asked}
detail: {description: baton's reason when it failed., type: str, returned: when baton was asked}
upgrade: {description: baton's report of the upgrade behind the install or revert., type: dict, returned: when baton was asked}
"""


class Baton:
    """`baton release ... --json` on this host."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        p = module.params
        self.base = [p["baton"], "release"]
        if p["control"]:
            self.base += ["--control", p["control"]]
        self.timeout = p["timeout"]

    def run(self, *args: str) -> tuple[int, str, str]:
        cmd = self.base + list(args) + ["--json"]
        try:
            out = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            self.module.fail_json(msg=f"{self.base[0]}: no such executable (set baton_bin)")
        except subprocess.TimeoutExpired:
            self.module.fail_json(
                msg=f"`{' '.join(cmd)}` gave no verdict within {self.timeout} s"
            )
        return out.returncode, out.stdout, out.stderr

    def fail(self, what: str, rc: int, stderr: str) -> None:
        lines = stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit status {rc}"
        for prefix in ("baton: error: ", "baton: "):
            if why.startswith(prefix):
                why = why[len(prefix):]
                break
        self.module.fail_json(msg=f"{what}: {why}", rc=rc, stderr=stderr)

    def releases(self) -> list[dict]:
        rc, out, err = self.run("list")
        if rc != 0:
            self.fail("baton release list", rc, err)
        try:
            return json.loads(out)
        except ValueError as e:
            self.module.fail_json(msg=f"baton release list: not JSON ({e}): {out[:200]}")
        return []

    def verdict(self, *args: str) -> tuple[int, dict]:
        """A request that answers with a release reply (install, rollback)."""
        rc, out, err = self.run(*args)
        try:
            return rc, json.loads(out)
        except ValueError:
            self.fail("baton release " + " ".join(args), rc, err)
        return rc, {}


def status_of(releases: list[dict], version: str) -> str | None:
    for r in releases:
        if r.get("version") == version:
            return r.get("status")
    return None


def permanent_of(releases: list[dict]) -> str:
    for r in releases:
        if r.get("status") == "permanent":
            return r["version"]
    return ""


def install(module: AnsibleModule, baton: Baton) -> None:
    p = module.params
    version = p["version"]
    releases = baton.releases()
    before = permanent_of(releases)
    result = {"version": version, "previous": before, "permanent": before}
    if before == version:
        module.exit_json(changed=False, msg=f"{version} is permanent already", **result)
    diff = {"before": f"permanent: {before}\n", "after": f"permanent: {version}\n"}
    if module.check_mode:
        module.exit_json(
            changed=True,
            msg=f"would install {version} (permanent now: {before or 'none'})",
            diff=diff,
            **result,
        )
    if status_of(releases, version) is None:
        if not p["src"]:
            module.fail_json(msg=f"{version} is not in the store and no src was given", **result)
        add = ["add", version, p["src"]]
        if p["program"]:
            add[1:1] = ["--program", p["program"]]
        rc, _, err = baton.run(*add)
        if rc != 0:
            baton.fail(f"baton release add {version}", rc, err)
    rc, reply = baton.verdict("install", version, "--wait")
    result["permanent"] = permanent_of(reply.get("releases", []))
    result.update(
        result=reply.get("result"), detail=reply.get("detail", ""), upgrade=reply.get("upgrade")
    )
    if rc == 0 and reply.get("result") == "permanent":
        module.exit_json(changed=True, msg=f"{version} is permanent (was {before})", diff=diff, **result)
    # Rolled back or reverted: the host serves `permanent` again, and the rollout stops here.
    what = str(reply.get("result", "failed")).replace("_", " ")
    module.fail_json(
        changed=result["permanent"] != before,
        msg=f"{version} {what}: {reply.get('detail', '')} (now on {result['permanent'] or 'none'})",
        **result,
    )


def revert(module: AnsibleModule, baton: Baton) -> None:
    version = module.params["version"]
    releases = baton.releases()
    before = permanent_of(releases)
    result = {"version": version, "previous": before, "permanent": before}
    status = status_of(releases, version)
    if status not in ("permanent", "current"):
        module.exit_json(
            changed=False, msg=f"{version} does not run here ({status or 'not in the store'})", **result
        )
    if module.check_mode:
        module.exit_json(changed=True, msg=f"would roll back from {version}", **result)
    rc, reply = baton.verdict("rollback", "--wait")
    result["permanent"] = permanent_of(reply.get("releases", []))
    result.update(
        result=reply.get("result"), detail=reply.get("detail", ""), upgrade=reply.get("upgrade")
    )
    diff = {"before": f"permanent: {before}\n", "after": f"permanent: {result['permanent']}\n"}
    if rc == 0 and result["permanent"] not in ("", version):
        module.exit_json(
            changed=True, msg=f"rolled back from {version} to {result['permanent']}", diff=diff, **result
        )
    module.fail_json(
        msg=f"rollback from {version} {reply.get('result', 'failed')}: {reply.get('detail', '')}",
        **result,
    )


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "version": {"type": "str", "required": True},
            "state": {"type": "str", "default": "permanent", "choices": ["permanent", "reverted"]},
            "src": {"type": "path"},
            "program": {"type": "str"},
            "control": {"type": "path"},
            "baton": {"type": "path", "default": "baton"},
            "timeout": {"type": "int", "default": 600},
        },
        supports_check_mode=True,
    )
    baton = Baton(module)
    if module.params["state"] == "permanent":
        install(module, baton)
    else:
        revert(module, baton)


if __name__ == "__main__":
    main()
