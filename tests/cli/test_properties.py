"""Property-based test of the whole command line (issue 13): every command driven with generated options and
generated or corrupted input files. Whatever the input, dpruner must

- exit with 0, 1, 2 or 3 (never 70, never a traceback);
- on an error, print exactly one `error:` sentence on stderr (a usage hint and the input-shape note aside);
- change no file in the working folder except the outputs the command names;
- leave no output behind on exit 2 (exit 1 of a data-free prune and exit 3 with --keep-on-failure write theirs, as
  docs/exit-codes.md says; a training run's OUTPUT.resume stays so that --resume can continue it);
- never run code from a checkpoint it was not told to trust;
- with --json, print exactly one strict JSON document (no NaN) on exit 0, 1 and 3, and nothing on exit 2.

The `ci` profile (tests/conftest.py) runs a few dozen examples; `--hypothesis-profile=long` runs 10,000
(docs/benchmarks.md records that run)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, strategies as st  # noqa: E402

import torch  # noqa: E402

from tests.cli.conftest import invoke  # noqa: E402
from tests.conftest import ROOT, SAMPLE_MODELS  # noqa: E402

HOSTILE = str(ROOT / "tests" / "hostile.py")
MARKER = "CODE_RAN"


class Evil:
    """Unpickling this runs `touch CODE_RAN` in the working folder."""

    def __reduce__(self):
        import os

        return os.system, (f"touch {MARKER}",)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Input files every example may copy: good checkpoints and deliberately bad ones."""
    import dpruner
    from tests.hostile import ok, split_net

    folder = tmp_path_factory.mktemp("pool")
    shutil.copy(SAMPLE_MODELS / "digits_vgg.pt", folder / "vgg.pt")
    torch.save(ok().state_dict(), folder / "sd.pt")
    torch.save(split_net().state_dict(), folder / "split.pt")
    loaded = dpruner.load_checkpoint(folder / "vgg.pt")
    pruned = dpruner.prune(loaded.model, torch.randn(1, 1, 8, 8), ratio=2.0)
    dpruner.save_checkpoint(folder / "pruned.pt", pruned.model, arch=loaded.arch, input_shape=loaded.input_shape,
                            plan=[pruned.plan])
    torch.save({"model": Evil()}, folder / "evil.pt")
    torch.save(Evil(), folder / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    (folder / "empty.pt").write_bytes(b"")
    (folder / "text.pt").write_text("not a checkpoint\n")
    torch.save({}, folder / "emptydict.pt")
    return folder


FILES = ["vgg.pt", "sd.pt", "pruned.pt", "split.pt", "evil.pt", "evil_legacy.pt", "empty.pt", "text.pt",
         "emptydict.pt", "missing.pt"]

BAD_NUMBERS = ["-1", "nan", "inf", "-inf", "1e308", "abc", "", "99999999999999999999", "0"]


def choose(draw, valid: list, invalid: list, p_bad: float = 0.1):
    """Mostly a valid value (so runs get deep into the commands), sometimes a bad one."""
    if invalid and draw(st.floats(0, 1)) < p_bad:
        return draw(st.sampled_from(invalid))
    return draw(st.sampled_from(valid))


@st.composite
def mutated(draw, pool_files=("vgg.pt", "sd.pt", "pruned.pt")):
    """A corrupted copy of a good checkpoint: (source, how, position, bytes)."""
    return (draw(st.sampled_from(pool_files)), draw(st.sampled_from(["truncate", "flip", "garbage", "deflate",
                                                                     "tamper"])),
            draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=16)))


TAMPER = {
    "plan": st.one_of(st.just("x"), st.just([{"version": 1, "modules": {"features.0": {"out": [0, 99999]}}}]),
                      st.just([{"version": 1, "modules": {"features.0": {"out": [-1, 0]}}}]), st.just([[1, 2]]),
                      st.just(None), st.just([{"version": "1"}])),
    "meta": st.sampled_from([[], "x", 3, None]),
    "input_shape": st.sampled_from(["abc", [1, -1, 8, 8], [1, 99999999999, 8, 8], [1, 1, 8], [], 5]),
    "arch": st.sampled_from(["dpruner.cli.app:main", "torchvision.models.detection:fasterrcnn_resnet50_fpn",
                             "os:system", "torchvision:nosuch", "nonsense", 5, "dpruner.zoo:resnet56"]),
    "num_classes": st.sampled_from([0, -3, "ten", 10**12]),
    "state_dict": st.sampled_from([None, {}, {"x": 1}, "abc"]),
    "dpruner_checkpoint": st.sampled_from([2, "1", None]),
}


def make_mutant(source: Path, how: str, where: float, data: bytes, target: Path, draw_tamper) -> None:
    raw = source.read_bytes()
    at = int(where * (len(raw) - 1))
    if how == "truncate":
        target.write_bytes(raw[:at])
    elif how == "flip":
        target.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
    elif how == "garbage":
        target.write_bytes(raw[:at] + data + raw[at + len(data):])
    elif how == "deflate":  # the same archive, compressed: torch.save never writes that
        with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))
    else:
        doc = torch.load(source, weights_only=True)
        if isinstance(doc, dict) and "dpruner_checkpoint" in doc:
            key, value = draw_tamper()
            doc[key] = value
        torch.save(doc, target)


@st.composite
def inputs(draw):
    """One model input: a pool file, or a mutant of one."""
    if draw(st.booleans()):
        return ("pool", draw(st.sampled_from(FILES)))
    return ("mutant", draw(mutated()))


def option(draw, name: str, valid: list, invalid: list = (), p_absent: float = 0.5, p_bad: float = 0.1) -> list[str]:
    """[name, value], [name] for a flag (value True), or [] when the option is left out."""
    if draw(st.floats(0, 1)) < p_absent:
        return []
    value = choose(draw, list(valid), list(invalid), p_bad)
    return [name] if value is True else [name, str(value)]


GOOD_MODELS = {"vgg.pt": [], "pruned.pt": [], "sd.pt": ["--arch", f"{HOSTILE}:ok", "--input-shape", "1,8,8"]}
DATA_GOOD = ["digits", "digits", f"python:{HOSTILE}:good_loaders"]
DATA_BAD = ["nosuch:x", "imagefolder:/no/such", f"python:{HOSTILE}:float_labels", f"python:{HOSTILE}:empty_val",
            f"python:{HOSTILE}:exits_when_called", f"python:{HOSTILE}:exits_while_loading",
            f"python:{HOSTILE}:labels_too_high", f"python:{HOSTILE}:int_inputs"]
ARCH_BAD = [f"{HOSTILE}:raises", f"{HOSTILE}:exits", f"{HOSTILE}:tuple_out", f"{HOSTILE}:split_net",
            f"{HOSTILE}:factory_exits", "torchvision:resnet18", "bad", "nosuch.py:f", "dpruner.cli.app:main",
            "torchvision.models.detection:fasterrcnn_resnet50_fpn"]
SHAPE_BAD = ["3,8,8", "0,1,1", "a,b", "1,20000,20000", "99999999999999999999,8,8", "1,8", "2,1,8,8"]


@st.composite
def commands(draw):
    command = draw(st.sampled_from(["analyze", "prune", "prune", "prune", "evaluate", "finetune", "export",
                                    "export", "report"]))
    if draw(st.floats(0, 1)) < 0.7:  # a good model, with what it needs
        name = draw(st.sampled_from(sorted(GOOD_MODELS)))
        model, args = ("pool", name), list(GOOD_MODELS[name])
    else:
        model, args = draw(inputs()), []
    if draw(st.floats(0, 1)) < 0.15:  # a wrong architecture or shape for it
        args += ["--arch", draw(st.sampled_from(ARCH_BAD))]
    if draw(st.floats(0, 1)) < 0.1:
        args += ["--input-shape", draw(st.sampled_from(SHAPE_BAD))]
    args += option(draw, "--num-classes", ["10"], ["3", "0", "-1", "x"], 0.9, 0.5)
    args += option(draw, "--json", [True], (), 0.5)
    data = ["--data", choose(draw, DATA_GOOD, DATA_BAD, 0.2)]
    quick = ["--batch-size", "512", "--quiet"]
    if command == "analyze":
        args += option(draw, "--full", [True], (), 0.8)
    elif command == "prune":
        args += ["-o", choose(draw, ["out.pt"], ["", "no/dir/out.pt", "x" * 300, ".", "vgg.pt"])]
        goal = choose(draw, ["ratio", "ratio", "sparsity", "tolerance", "ratio-data"], ["none", "both"])
        if goal in ("ratio", "ratio-data", "both"):
            args += ["--ratio", choose(draw, ["2x", "1.5", "3x"], ["inf", "nan", "0.5", "abc", "1e308", "100x"])]
        if goal in ("sparsity", "both"):
            args += ["--sparsity", choose(draw, ["0.3", "0.5"], ["1.5", "nan", "0", "-1"])]
        if goal == "tolerance":
            args += ["--tolerance", choose(draw, ["2%", "0.05"], ["150%", "nan", "0", "abc"])]
            args += ["--budget-epochs", choose(draw, ["0.3"], ["nan", "inf", "-1", "0", "0.01"])]
            args += ["--step-epochs", choose(draw, ["0.05"], ["nan", "0", "1e9"])]
            args += option(draw, "--penalty", ["5", "0"], BAD_NUMBERS, 0.7)
            args += option(draw, "--resume", [True], (), 0.85)
        if goal in ("tolerance", "ratio-data"):
            args += data + quick
            if goal == "ratio-data":
                args += ["--budget-epochs", choose(draw, ["0.05"], ["nan", "inf", "-1"])]
        args += option(draw, "--method", ["l1", "l2", "fpgm", "bn", "random"], ["bogus"], 0.5)
        args += option(draw, "--allocation", ["uniform", "global"], ["x"], 0.7)
        args += option(draw, "--exclude", ["features.0*", "conv"], ["*", "["], 0.7, 0.3)
        args += option(draw, "--round-to", ["1", "2", "8"], ["0", "-2", "100000"], 0.7)
        args += option(draw, "--max-fraction", ["0.5", "0.9"], BAD_NUMBERS + ["1"], 0.8)
        args += option(draw, "--target", ["macs", "params"], ["x"], 0.8)
        args += option(draw, "--seed", ["0", "7"], ["-1", "1e23", "4294967296"], 0.7)
    elif command in ("evaluate", "finetune"):
        args += data + quick
        if command == "finetune":
            args += ["-o", choose(draw, ["out.pt"], ["", "no/dir/out.pt", ".", "vgg.pt"])]
            args += ["--epochs", choose(draw, ["0.05", "0.1"], ["nan", "inf", "-1", "0", "1e300"])]
            args += option(draw, "--lr", ["0.01"], BAD_NUMBERS, 0.7)
            args += option(draw, "--resume", [True], (), 0.8)
            args += option(draw, "--teacher", ["vgg.pt"], ["missing.pt", "empty.pt", "out.pt", "evil.pt"], 0.8, 0.5)
            args += option(draw, "--seed", ["0", "3"], ["-1", "1e23"], 0.8)
    elif command == "export":
        args += ["--onnx", choose(draw, ["out.onnx"], ["", "no/dir/o.onnx", "vgg.pt", "."])]
        args += option(draw, "--baseline", ["vgg.pt"], ["missing.pt", "text.pt", "sd.pt", "evil.pt"], 0.6, 0.3)
        args += option(draw, "--atol", ["1e-4", "1e-3"], BAD_NUMBERS, 0.6)
        args += option(draw, "--opset", ["17", "13"], ["999", "-1"], 0.8)
        args += option(draw, "--static-batch", [True], (), 0.8)
        args += option(draw, "--keep-on-failure", [True], (), 0.8)
        args += option(draw, "--markdown", ["out.md"], ["no/dir/r.md", "vgg.pt"], 0.7)
        args += option(draw, "--batches", ["1,8", "1"], ["0", "100000000", "a"], 0.7)
        args += ["--no-latency"] + (data if draw(st.floats(0, 1)) < 0.2 else [])
    else:  # report
        args.insert(0, choose(draw, ["vgg.pt", "pruned.pt"], ["missing.pt", "text.pt", "evil.pt"]))
        args += option(draw, "--markdown", ["out.md"], ["no/dir/r.md"], 0.7)
        args += option(draw, "--batches", ["1,8", "1"], ["0", "100000000", "a"], 0.7)
        args += ["--no-latency"] + (data if draw(st.floats(0, 1)) < 0.2 else [])
    tamper = draw(st.sampled_from(sorted(TAMPER)))
    tamper_value = draw(TAMPER[tamper])
    damaged_state = choose(draw, [None], [b"garbage", "list", "fields"], 0.15)
    return command, model, args, (tamper, tamper_value), damaged_state


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@given(case=commands())
def test_every_command_fails_cleanly_on_generated_input(case, pool, tmp_path_factory):
    command, (kind, spec), args, tamper, damaged_state = case
    work = tmp_path_factory.mktemp("work")
    for name in FILES:
        if (pool / name).exists():
            shutil.copy(pool / name, work / name)
    if kind == "pool":
        model = spec
    else:
        model = "mutant.pt"
        make_mutant(pool / spec[0], spec[1], spec[2], spec[3], work / model, lambda: tamper)
    if damaged_state is not None:
        if damaged_state == b"garbage":
            (work / "out.pt.resume").write_bytes(b"garbage")
        elif damaged_state == "list":
            torch.save([1, 2], work / "out.pt.resume")
        else:
            torch.save({"format": "dpruner_run_state", "method": "finetune", "config": 3, "model": {}, "progress": None},
                       work / "out.pt.resume")
    argv = [command, model, *args]
    note(" ".join(f"'{a}'" if " " in a or not a else a for a in argv))
    before = digest(work)
    began = time.perf_counter()
    run = invoke(*argv, cwd=work)
    note(f"exit {run.code}\nstderr: {run.stderr[-2000:]}")
    after = digest(work)
    if os.environ.get("DPRUNER_PROPERTY_LOG"):  # what the run covered: argv, exit code, the error sentence
        with open(os.environ["DPRUNER_PROPERTY_LOG"], "a") as log:
            log.write(json.dumps({"argv": argv, "code": run.code, "seconds": round(time.perf_counter() - began, 3),
                                  "error": next((l for l in run.stderr.splitlines() if l.startswith("error")), None)})
                      + "\n")

    assert run.code in (0, 1, 2, 3), run.stderr
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr
    assert not (work / MARKER).exists(), "a checkpoint ran code without --trust-checkpoint"
    if run.code != 0:
        lines = [line for line in run.stderr.splitlines()
                 if line.strip() and not line.startswith("input shape ")]  # the torchvision-default note
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1, run.stderr
        assert lines[-1].startswith(("error: ", "usage: ")), run.stderr
    if "--json" in argv:  # stdout is exactly one JSON document (strict: no NaN), or empty on exit 2
        if run.code in (0, 1) or (run.code == 3 and run.stdout):  # onnx.checker's exit 3 has no document
            json.loads(run.stdout, parse_constant=lambda name: pytest.fail(f"{name} in the JSON output"))
        else:
            assert run.stdout == "", run.stdout[:500]
    named = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-o", "--onnx", "--markdown")}
    outputs = named | {f"{name}.resume" for name in named}
    inputs = {a for a in argv if a in before} - outputs
    changed = {name for name in before if after.get(name) != before[name]}
    new = set(after) - set(before)
    assert not changed & inputs, f"an input file changed: {changed & inputs}"
    assert changed <= outputs and new <= outputs, (changed, new)
    assert not [name for name in after if name.endswith(".tmp") or ".tmp." in name]
    written = {name for name in new | changed if not name.endswith(".resume")}
    model_out = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"}
    onnx_out = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--onnx"}
    report_out = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--markdown"}
    if run.code == 2:
        assert not written, written
    elif run.code == 1:
        assert written <= (model_out if command == "prune" and "--data" not in args else set()), written
    elif run.code == 3:
        assert written <= (onnx_out if "--keep-on-failure" in args else set()) | report_out, written
    shutil.rmtree(work, ignore_errors=True)
