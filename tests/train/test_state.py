"""The one resumable-state format shared by finetune, the tolerance controller and the methods."""

from pathlib import Path

import pytest
import torch

from dpruner.errors import InputError
from dpruner.train.state import FORMAT, check_state, load_state, make_state, state_path_for


def test_round_trip_returns_progress(tmp_path):
    state = make_state("tolerance", {"a": 1}, {"w": torch.ones(2)}, {"step": 3, "rate": 0.5}, plans=[{"p": 1}])
    path = state_path_for(tmp_path / "out.pt")
    assert path.name == "out.pt.resume"
    torch.save(state, path)
    loaded = load_state(path)
    assert loaded["format"] == FORMAT and loaded["plans"] == [{"p": 1}]
    assert check_state(loaded, "tolerance", {"a": 1}, {"step": int, "rate": float}, path) == {"step": 3, "rate": 0.5}


def test_a_state_resumes_only_its_own_method_and_options():
    state = make_state("tolerance", {"a": 1}, {}, {"step": 1})
    with pytest.raises(InputError, match="saved by a tolerance run, not finetune"):
        check_state(state, "finetune", {"a": 1}, {}, "x")
    with pytest.raises(InputError, match="same model, data and options"):
        check_state(state, "tolerance", {"a": 2}, {}, "x")
    with pytest.raises(InputError, match="not a dpruner run state"):
        check_state({**state, "format": "dpruner_train_state"}, "tolerance", {"a": 1}, {}, "x")


def test_damaged_progress_is_one_sentence():
    state = make_state("finetune", {}, {}, {"step": "three"})
    with pytest.raises(InputError, match=r"'x.resume' is damaged \(its 'step' field"):
        check_state(state, "finetune", {}, {"step": int}, Path("x.resume"))


def test_unreadable_file_is_a_user_error(tmp_path):
    (tmp_path / "s").write_bytes(b"garbage")
    with pytest.raises(InputError, match="Cannot read the saved state"):
        load_state(tmp_path / "s")
