"""`analyze --data`: the widths PCA would keep for every channel group (seed 001's width rule)."""

from __future__ import annotations

import json

import torch

from dpruner.analysis import analyze
from tests.methods.test_pca_allocation import RankK, _data


def test_each_group_reports_the_width_its_activations_need():
    result = analyze(RankK(k=3).eval(), (1, 3, 8, 8), data=_data())
    group = next(g for g in result.groups if g["layers"][0] == "conv1")
    assert group["pca_widths"] == {"0.9": group["pca_widths"]["0.9"], "0.95": group["pca_widths"]["0.95"], "0.99": 3}
    assert group["pca_widths"]["0.9"] <= group["pca_widths"]["0.95"] <= 3
    assert all("pca_widths" not in g for g in analyze(RankK().eval(), (1, 3, 8, 8)).groups)  # data-free: none


def test_cli_analyze_with_data_lists_pca_widths():
    from tests.cli.conftest import invoke
    from tests.conftest import SAMPLE_MODELS

    run = invoke("analyze", SAMPLE_MODELS / "digits_resnet.pt", "--data", "digits", "--json")
    assert run.code == 0, run.stderr
    groups = [g for g in json.loads(run.stdout)["groups"] if g["prunable"]]
    assert groups and all(1 <= g["pca_widths"]["0.99"] <= g["channels"] for g in groups)
    table = invoke("analyze", SAMPLE_MODELS / "digits_resnet.pt", "--data", "digits")
    assert "PCA widths" in table.stdout
