"""One party as its own OS process: a client with only its identity directory, driven line by line over stdin.

``python -m tests.faas.party_proc URL FINGERPRINT MEASUREMENT IDENTITY_DIR`` connects once (real TLS, attested),
prints ``{"ready": party_id}``, then answers one JSON command per line with one JSON line: ``{"ok": value}`` or
``{"error": class name, "code": wire code, "message": ...}``. Bytes travel as ``{"b64": ...}``. The test process
holds none of this party's keys or sessions.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import mesatee_notebook as mn


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _status(st: Any) -> dict[str, Any]:
    return {
        "state": st.state,
        "spec_digest": st.spec_digest,
        "missing_approvals": sorted(st.missing_approvals),
        "error": st.error,
        "params": st.info.get("params"),
    }


def _upload(s: mn.Session, cmd: dict[str, Any]) -> str:
    rng = np.random.default_rng(int(cmd["seed"]))
    n = int(cmd["rows"])
    s.upload(pd.DataFrame({"x": rng.normal(size=n), "y": rng.integers(0, 100, n)}), str(cmd["name"]))
    return str(cmd["name"])


def _result(s: mn.Session, cmd: dict[str, Any]) -> Any:
    res = s.tasks.result(str(cmd["name"]))
    return {"value": res.value, "function": res.function, "approvals": sorted(res.approvals)}


def handle(s: mn.Session, cmd: dict[str, Any]) -> Any:
    """One command; the names are the client API's (``functions.register``, ``tasks.create``, ...)."""
    op = cmd["op"]
    if op == "upload":
        return _upload(s, cmd)
    if op == "register":
        fn = s.functions.register(str(cmd["name"]), python=str(cmd["source"]), inputs=list(cmd["inputs"]))
        return fn.digest
    if op == "create":
        kw = {k: cmd[k] for k in ("args", "receivers", "keys") if k in cmd}
        return _status(s.tasks.create(str(cmd["name"]), function=str(cmd["function"]), inputs=cmd["inputs"], **kw))
    if op == "status":
        return _status(s.tasks.status(str(cmd["name"])))
    if op == "approve":
        return _status(s.tasks.approve(str(cmd["name"]), spec_digest=cmd.get("spec_digest")))
    if op == "result":
        return _result(s, cmd)
    if op == "key.create":
        return s.keys.create(str(cmd["name"]), kind=str(cmd.get("kind", "ed25519")))["public_key"]
    msg = f"unknown command {op!r}"
    raise ValueError(msg)


def main() -> None:
    url, fingerprint, measurement, identity = sys.argv[1:5]
    policy = mn.Policy(platform_roots=[fingerprint], measurements=[measurement])
    s = mn.connect(url, policy=policy, identity=Path(identity))
    print(json.dumps({"ready": s.party_id}), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            try:
                reply: dict[str, Any] = {"ok": _jsonable(handle(s, cmd))}
            except mn.MesateeError as exc:
                reply = {"error": type(exc).__name__, "code": exc.code, "message": exc.message}
            print(json.dumps(reply), flush=True)
    finally:
        s.close()


if __name__ == "__main__":
    main()
