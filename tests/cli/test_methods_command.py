"""`dpruner methods`: every criterion in the registry is listed with what it needs, as a table and as JSON."""

from __future__ import annotations

import json

from tests.cli.conftest import invoke


def test_methods_lists_every_criterion_and_what_it_needs():
    from dpruner.criteria import CRITERIA

    run = invoke("methods", "--json")
    assert run.code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [c["name"] for c in doc["criteria"]] == list(CRITERIA)
    needs = {c["name"]: c for c in doc["criteria"]}
    assert needs["taylor"]["data"] and "gradients" in needs["taylor"]["needs"] and not needs["l1"]["data"]
    assert {a["name"] for a in doc["allocations"]} == {"uniform", "global", "pca", "sensitivity"}
    assert {m["name"] for m in doc["methods"]} == {"one-shot", "tolerance", "pca-gm", "spp", "gate", "coarse"}
    table = invoke("methods")
    assert table.code == 0 and "taylor" in table.stdout and "Allocations" in table.stdout
