"""Registered Python functions run as tasks approved by the data owners, against a real sandboxed kernel."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from mesatee_notebook.errors import EncodingError, NotFound, PolicyViolation
from mesatee_notebook.remote.faas import SecureFunction
from tests.faas.conftest import Parties, unique

JOIN_STATS = """
import pandas as pd

def main(left, right, scale=1):
    both = pd.concat([left, right], ignore_index=True)
    return {"rows": len(both), "mean_y": float(both["y"].mean()) * scale, "columns": sorted(left.columns)}
"""


def register(p: Parties, source: str = JOIN_STATS, **kw: Any) -> SecureFunction:
    fn = p.a.functions.register(
        unique("stats"),
        python=source,
        entry="main",
        inputs=["left", "right"],
        description="row count and mean of y over two tables",
        **kw,
    )
    assert isinstance(fn, SecureFunction)
    return fn


def create(p: Parties, fn: SecureFunction, name: str, **kw: Any) -> Any:
    kw.setdefault("args", {"scale": 2})
    kw.setdefault("receivers", [p.a.party_id])
    return p.a.tasks.create(name, function=fn, inputs={"left": p.ds_b, "right": p.ds_c}, **kw)


def test_register_approve_run_result_only_to_receiver(parties: Parties) -> None:
    p = parties
    fn = register(p)
    assert len(fn.digest) == 64 and fn.lang == "python"
    assert "SecureFunction" in repr(fn) and fn.digest[:16] in repr(fn)
    assert "<table>" in fn._repr_html_() and "def main" in fn._repr_html_()
    # an owner asked to approve reads the exact source and digest
    seen = p.b.functions.get(fn.digest)
    assert seen.code == JOIN_STATS and seen.digest == fn.digest
    name = unique("task")
    status = create(p, fn, name)
    assert status.state == "created" and sorted(status.missing_approvals) == sorted([p.b.party_id, p.c.party_id])
    st_b = p.b.tasks.status(name)
    assert st_b.info["params"]["function"] == fn.digest and st_b.info["params"]["args"] == {"scale": 2}
    p.b.tasks.approve(name, spec_digest=st_b.spec_digest)
    with pytest.raises(PolicyViolation):  # not run yet: C has not approved
        p.a.tasks.result(name)
    done = p.c.tasks.approve(name)
    assert done.state == "done", done.error
    res = p.a.tasks.result(name)
    both = pd.concat([p.sales_b, p.sales_c])
    assert res.value["rows"] == len(both)
    assert res.value["mean_y"] == pytest.approx(both["y"].mean() * 2)
    assert res.value["columns"] == ["x", "y"]  # the hidden column never reached the function
    assert res.function == fn.digest and sorted(res.approvals) == sorted([p.b.party_id, p.c.party_id])
    assert set(res.inputs) == {"left", "right"} and all(len(d) == 64 for d in res.inputs.values())
    assert res.receipt is not None
    for other in (p.b, p.c):  # owners are not receivers
        with pytest.raises(PolicyViolation):
            other.tasks.result(name)
    kinds = [
        (e["kind"], (e.get("details") or {}).get("service"))
        for e in p.b.audit()
        if (e.get("details") or {}).get("job_id") == done.job_id
    ]
    assert ("job", "faas.task") in kinds


def test_approval_for_a_different_digest_is_refused(parties: Parties) -> None:
    p = parties
    fn = register(p)
    n1, n2 = unique("task"), unique("task")
    create(p, fn, n1, args={"scale": 1})
    other = create(p, fn, n2, args={"scale": 1000})  # same function, different args -> different spec digest
    with pytest.raises(PolicyViolation, match="digest"):
        p.b.tasks.approve(n1, spec_digest=other.spec_digest)
    assert p.b.party_id in p.a.tasks.status(n1).missing_approvals


def test_rejected_task_never_runs(parties: Parties) -> None:
    p = parties
    fn = register(p)
    name = unique("task")
    create(p, fn, name)
    p.b.tasks.approve(name)
    st = p.c.tasks.reject(name)
    assert st.state == "cancelled"
    with pytest.raises(PolicyViolation):
        p.a.tasks.result(name)


def test_bad_registrations_and_tasks_are_typed_errors(parties: Parties) -> None:
    p = parties
    with pytest.raises(EncodingError, match="does not compile"):
        p.a.functions.register("broken", python="def main(:\n")
    with pytest.raises(EncodingError, match="malformed"):
        p.a.functions.register("badwasm", wasm=b"\x00asm\x01\x00\x00\x00garbage")
    with pytest.raises(EncodingError, match="malformed"):
        p.a.functions.register("notwasm", wasm=b"definitely not a module")
    with pytest.raises(NotFound):
        p.a.functions.get("0" * 64)
    fn = register(p)
    with pytest.raises(EncodingError, match="takes the inputs"):
        p.a.tasks.create(unique("t"), function=fn, inputs={"left": p.ds_b})
    with pytest.raises(NotFound):
        p.a.tasks.create(unique("t"), function=fn, inputs={"left": p.ds_b, "right": "no_such_dataset"})


ESCAPE = """
def main(data, secret_dir, shared_dir):
    import os, socket
    out = {}
    try:
        with open(shared_dir + "/leak.csv", "w") as fh:
            fh.write(data.to_csv())
        out["shared"] = "written"
    except OSError as exc:
        out["shared"] = type(exc).__name__
    for path in (secret_dir, secret_dir + "/platform", "/etc/shadow"):
        try:
            out[path] = len(os.listdir(path)) if os.path.isdir(path) else len(open(path).read())
        except OSError as exc:
            out[path] = type(exc).__name__
    try:
        socket.create_connection(("127.0.0.1", 22), timeout=1)
        out["net"] = "connected"
    except OSError as exc:
        out["net"] = type(exc).__name__
    try:
        mesatee.keys.sign("any", b"x")  # noqa: F821 - the function API: this task names no keys
        out["api"] = "signed"
    except Exception as exc:
        out["api"] = type(exc).__name__
    import gc

    # around the function API: the harness cell's own mesatee object (the executor runs as __main__), whose
    # requests go to the supervisor
    trusted = next(o for o in gc.get_objects() if type(o).__name__ == "TrustedAPI")
    for what, reach in (("seal", lambda: trusted.open("notes", "r").read()),
                        ("raw_key", lambda: trusted.keys.sign("any", b"x"))):
        try:
            reach()
            out[what] = "reached"
        except Exception as exc:
            out[what] = type(exc).__name__
    return out
"""


def test_python_function_runs_sandboxed_with_only_its_inputs(parties: Parties) -> None:
    p = parties
    fn = p.b.functions.register(unique("probe"), python=ESCAPE, inputs=["data"])
    name = unique("task")
    secret = str(p.kernel.data_dir)  # the kernel's sealed state and platform key
    args = {"secret_dir": secret, "shared_dir": str(p.kernel.untrusted_dir)}
    p.b.tasks.create(name, function=fn, inputs={"data": p.ds_b}, args=args, receivers=[p.b.party_id])
    res = p.b.tasks.result(name).value
    assert res["net"] != "connected"
    assert res["/etc/shadow"] in ("PermissionError", "FileNotFoundError")
    assert res[secret] in ("PermissionError", "FileNotFoundError")
    assert res[secret + "/platform"] in ("PermissionError", "FileNotFoundError")
    assert res["api"] == "PolicyViolation"  # the task names no keys
    assert res["seal"] == "PolicyViolation" and res["raw_key"] == "PolicyViolation"  # the supervisor refuses both
    assert res["shared"] != "written"  # cells may share a host directory; functions never see it
    assert p.kernel.untrusted_dir is not None and not (p.kernel.untrusted_dir / "leak.csv").exists()


def test_output_dataset_only_receivers_can_query(parties: Parties) -> None:
    p = parties
    src = "def main(data):\n    return data[data.y > 50].reset_index(drop=True)\n"
    fn = p.b.functions.register(unique("filter"), python=src, inputs=["data"])
    name, out = unique("task"), f"big_{unique('y').replace('-', '_')}"
    st = p.b.tasks.create(name, function=fn, inputs={"data": p.ds_b}, receivers=[p.a.party_id], output_dataset=out)
    assert st.state == "done", st.error
    assert p.a.tasks.result(name).dataset == out
    assert out in {d["name"] for d in p.a.datasets()}
    assert out not in {d["name"] for d in p.c.datasets()}


def test_builtin_linear_regression_and_pca(parties: Parties) -> None:
    import numpy as np

    p = parties
    fn = p.a.functions.builtin("linear_regression")
    assert fn.registered_by == "enclave" and isinstance(fn.code, str) and "LinearRegression" in fn.code
    name = unique("linreg")
    p.a.tasks.create(name, function=fn, inputs={"data": p.ds_c}, args={"label": "y", "features": ["x"]})
    st = p.c.tasks.approve(name)
    assert st.state == "done", st.error
    got = p.a.tasks.result(name).value
    slope, intercept = np.polyfit(p.sales_c["x"], p.sales_c["y"], 1)
    assert got["coef"][0] == pytest.approx(slope) and got["intercept"] == pytest.approx(intercept)
    pca = p.b.functions.builtin("pca")
    n2 = unique("pca")
    st = p.b.tasks.create(n2, function=pca, inputs={"data": p.ds_b}, args={"n_components": 1}, receivers=[p.b.party_id])
    assert st.state == "done", st.error
    out = p.b.tasks.result(n2).value
    assert out["features"] == ["x", "y"] and len(out["components"][0]) == 2
    names = {f.name for f in p.c.functions.list() if f.registered_by == "enclave"}
    assert names >= {"linear_regression", "logistic_regression_train", "logistic_regression_predict", "pca"}


APPROVE_IN_OWN_PROCESS = """
import sys
import mesatee_notebook as mn
url, fp, measurement, identity, task = sys.argv[1:]
s = mn.connect(url, policy=mn.Policy(platform_roots=[fp], measurements=[measurement]), identity=identity)
print(s.tasks.approve(task).state)
s.close()
"""


def test_owner_approves_from_its_own_process(parties: Parties, tmp_path_factory: pytest.TempPathFactory) -> None:
    """C is a separate OS process with only its identity directory: its approval is what runs the task."""
    import subprocess
    import sys

    p = parties
    fn = register(p)
    name = unique("task")
    create(p, fn, name)
    p.b.tasks.approve(name)
    ident = p.c_identity
    k = p.kernel
    out = subprocess.run(
        [sys.executable, "-c", APPROVE_IN_OWN_PROCESS, k.url, k.fingerprint, k.measurement, str(ident), name],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "done", out.stderr[-2000:]
    assert p.a.tasks.result(name).value["rows"] == len(p.sales_b) + len(p.sales_c)
