"""Hostile inputs: files and options made to exhaust memory, run code, reach the network or crash dpruner. Each must
end in one DprunerError sentence (exit 2 from the CLI), decided before anything big is allocated or run."""

from __future__ import annotations

import os
import pickle
import re
import resource
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from dpruner.errors import ArchError, CheckpointError, InputError, ShapeError
from dpruner.io import load_checkpoint, save_checkpoint
from dpruner.io.arch import build_model, parse_arch
from dpruner.io.checkpoint import check_torch_version
from dpruner.io.limits import Limits, limits_from_env
from dpruner.io.network import NetworkBlockedError, no_network
from dpruner.io.shapes import check_input_elements, parse_input_shape, resolve_input_shape
from tests.conftest import ROOT, TinyNet

SAMPLE = ROOT / "sample_models" / "digits_vgg.pt"
GiB = 1 << 30


def run_cli(*args, cwd, env=None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("DPRUNER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "dpruner", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if anything reaches torch.load: the refusal must come from metadata alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a file that should have been refused before loading")

    monkeypatch.setattr(torch, "load", refuse)


# --- 1a. memory: zip bombs, the load limit, legacy storages ------------------------------------------------------

@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory):
    """A real torch.save archive plus a 1 GiB zero-filled data/1 entry, deflated (a few MB on disk)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.pt"
    plain = path.with_name("plain.pt")
    torch.save({"w": torch.zeros(3)}, plain)
    chunk = bytes(16 << 20)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        prefix = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        with dst.open(f"{prefix}/data/1", "w", force_zip64=True) as fh:
            for _ in range(GiB // len(chunk)):
                fh.write(chunk)
    assert path.stat().st_size < 64 << 20
    return path


def test_zip_bomb_is_refused_from_its_directory(zip_bomb, no_torch_load):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"inflate to 1\.0 GiB.*zip bomb"):
        load_checkpoint(zip_bomb)
    assert time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 << 10


def test_zip_bomb_cli(zip_bomb, tmp_path):
    assert_one_line_error(run_cli("analyze", zip_bomb, "--json", cwd=tmp_path), "zip bomb")


def test_load_limit_is_named_and_overridable(tmp_path, no_torch_load):
    path = tmp_path / "w.pt"
    torch.save(TinyNet().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"more than dpruner's load limit of 100 bytes.*DPRUNER_MAX_LOAD_BYTES="):
        load_checkpoint(path, limits=Limits(max_load_bytes=100))


def test_load_limit_from_the_environment_cli(tmp_path):
    proc = run_cli("analyze", SAMPLE, "--json", cwd=tmp_path, env={"DPRUNER_MAX_LOAD_BYTES": "1K"})
    assert_one_line_error(proc, "load limit of 1.0 KiB", "DPRUNER_MAX_LOAD_BYTES")
    proc = run_cli("analyze", SAMPLE, "--json", cwd=tmp_path, env={"DPRUNER_MAX_LOAD_BYTES": "lots"})
    assert_one_line_error(proc, "DPRUNER_MAX_LOAD_BYTES must be a positive whole number")


def test_limits_from_env():
    assert limits_from_env({}) == Limits()
    assert Limits().max_load_bytes == 8 * GiB and Limits().max_input_elements == 2**26
    got = limits_from_env({"DPRUNER_MAX_LOAD_BYTES": "16G", "DPRUNER_MAX_INPUT_ELEMENTS": "1_000"})
    assert got == Limits(max_load_bytes=16 * GiB, max_input_elements=1000)
    assert limits_from_env({"DPRUNER_MAX_LOAD_BYTES": "2GiB"}).max_load_bytes == 2 * GiB
    for bad in ("0", "-5", "1.5G", "12 parsecs"):
        with pytest.raises(InputError, match="DPRUNER_MAX_INPUT_ELEMENTS must be a positive whole number"):
            limits_from_env({"DPRUNER_MAX_INPUT_ELEMENTS": bad})


def test_legacy_file_declaring_more_storage_than_it_holds(tmp_path, no_torch_load):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    numel = b"cpu" + data.split(b"cpu", 1)[1][:2]  # 'cpu', BINPUT n, then BININT1 3 (the numel)
    at = data.index(numel) + len(numel)
    assert data[at:at + 2] == b"K\x03"
    path.write_bytes(data[:at] + b"J" + (1 << 30).to_bytes(4, "little") + data[at + 2:])  # BININT 2**30 floats
    with pytest.raises(CheckpointError, match=r"declares 4\.0 GiB of tensor data but holds only"):
        load_checkpoint(path)


# --- 1b. input shapes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    ("1,20000,20000", "has 400,000,000 elements"),
    ("99999999999999999999,8,8", "more than the limit of 67,108,864"),
])
def test_huge_input_shapes_are_refused(text, fragment):
    with pytest.raises(ShapeError, match=fragment) as info:
        parse_input_shape(text)
    assert str(info.value).startswith("--input-shape ") and "DPRUNER_MAX_INPUT_ELEMENTS" in str(info.value)


def test_input_shape_limit_is_overridable():
    assert parse_input_shape("3,8,8", limits=Limits(max_input_elements=192)) == (1, 3, 8, 8)
    with pytest.raises(ShapeError, match="limit of 191"):
        parse_input_shape("3,8,8", limits=Limits(max_input_elements=191))
    check_input_elements((64, 3, 224, 224), "--batches 64")
    with pytest.raises(ShapeError, match=r"^--batches 4096 4096,3,224,224 has"):
        check_input_elements((4096, 3, 224, 224), "--batches 4096")


def test_bad_stored_shape_is_blamed_on_the_checkpoint():
    with pytest.raises(ShapeError, match=r"^the input shape stored in 'ckpt\.pt' must be C,H,W") as info:
        resolve_input_shape(None, stored=[1, "x", 8], source="ckpt.pt")
    assert "--input-shape must" not in str(info.value)
    with pytest.raises(ShapeError, match=r"^the input shape stored in 'ckpt\.pt' 1,1,100000,100000 has"):
        resolve_input_shape(None, stored=[1, 1, 100000, 100000], source="ckpt.pt")
    assert resolve_input_shape("3,8,8", stored=[1, 1, 100000, 100000]) == ((1, 3, 8, 8), "--input-shape")


@pytest.mark.parametrize("shape", ["1,20000,20000", "99999999999999999999,8,8"])
def test_huge_input_shape_cli(shape, tmp_path):
    assert_one_line_error(run_cli("analyze", SAMPLE, "--input-shape", shape, "--json", cwd=tmp_path),
                          "DPRUNER_MAX_INPUT_ELEMENTS")


# --- 2. architecture names inside files, the network, user code ------------------------------------------------

def test_only_documented_builders_are_trusted():
    assert parse_arch("torchvision:resnet18").trusted
    assert parse_arch("dpruner.zoo:digits_vgg").trusted and parse_arch("dpruner.zoo:resnet56").trusted
    for text in ("torchvision.models.detection:fasterrcnn_resnet50_fpn", "dpruner.cli.app:main",
                 "dpruner.zoo.digits:digits_vgg", "dpruner.zoo:import_module", "dpruner.zoo:__name__"):
        assert not parse_arch(text).trusted, text


def write_dpruner_checkpoint(path, **fields):
    obj = {"dpruner_checkpoint": 1, "arch": "dpruner.zoo:digits_vgg", "num_classes": None, "input_shape": None,
           "plan": [], "state_dict": {}, "meta": {}, **fields}
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("arch", ["torchvision.models.detection:fasterrcnn_resnet50_fpn", "dpruner.cli.app:main"])
def test_checkpoint_naming_other_code_is_refused(arch, tmp_path, monkeypatch):
    path = write_dpruner_checkpoint(tmp_path / "c.pt", arch=arch)
    monkeypatch.setattr("dpruner.io.arch.build_model", lambda *a, **k: pytest.fail("built without confirmation"))
    with pytest.raises(CheckpointError, match=f"names its architecture as '{arch}'.*--arch {arch} or pass "
                                              "--trust-checkpoint"):
        load_checkpoint(path)


def test_checkpoint_naming_the_cli_is_refused_cli(tmp_path):
    path = write_dpruner_checkpoint(tmp_path / "c.pt", arch="dpruner.cli.app:main")
    assert_one_line_error(run_cli("analyze", path, "--json", cwd=tmp_path), "would import and run that code")


def test_explicit_arch_that_downloads_is_stopped_cli(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(TinyNet().state_dict(), path)
    arch = "torchvision.models.detection:fasterrcnn_resnet50_fpn"
    proc = run_cli("analyze", path, "--arch", arch, "--json", cwd=tmp_path, env={"TORCH_HOME": str(tmp_path / "th")})
    assert_one_line_error(proc, f"Building '{arch}' tried to download weights (https://", "dpruner never downloads",
                          "--arch torchvision:fasterrcnn_resnet50_fpn")
    assert not (tmp_path / "th").exists()  # not even torch.hub's cache folder was made


FACTORIES = '''
import sys
import urllib.request

import torch.hub

from tests.conftest import TinyNet


def fetches():
    urllib.request.urlopen("http://example.com/weights.pth", timeout=5)


def downloads():
    torch.hub.load_state_dict_from_url("https://example.com/w.pth")


def swallows():
    try:
        urllib.request.urlopen("http://example.com/weights.pth", timeout=5)
    except OSError:
        pass
    return TinyNet()


def exits():
    sys.exit(3)


def fails():
    return 1 / 0
'''


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


@pytest.mark.parametrize("factory, fragment", [
    ("fetches", "tried to look up the host example.com"),
    ("downloads", "tried to download weights (https://example.com/w.pth)"),
])
def test_user_factories_cannot_reach_the_network(factories, factory, fragment):
    original = (socket.getaddrinfo, socket.socket.connect, torch.hub.download_url_to_file)
    with pytest.raises(ArchError, match=rf"^Building '.*factories\.py:{factory}' {re.escape(fragment)}"):
        build_model(f"{factories}:{factory}")
    assert (socket.getaddrinfo, socket.socket.connect, torch.hub.download_url_to_file) == original
    assert isinstance(build_model(f"{factories}:swallows"), TinyNet)  # a refusal the factory handles is fine


def test_no_network_blocks_internet_but_not_local_sockets():
    with pytest.raises(ArchError, match="^x tried to connect to 192.0.2.1:80; dpruner never downloads"):
        with no_network("x"):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.connect(("192.0.2.1", 80))
    with no_network("x"):
        assert socket.getaddrinfo("localhost", 80)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            assert sock.connect_ex("/nonexistent/dpruner.sock") != 0  # allowed: fails as the OS says
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            assert sock.connect_ex(("127.0.0.1", 9)) != 0  # loopback allowed (nothing listens on port 9)
        with pytest.raises(NetworkBlockedError):
            socket.gethostbyname("example.com")


@pytest.mark.parametrize("factory, fragment", [
    ("exits", "' called sys.exit(3); dpruner stopped there."),
    ("fails", "' failed: ZeroDivisionError: division by zero"),
])
def test_user_factory_exit_and_errors_become_one_sentence(factories, factory, fragment):
    with pytest.raises(ArchError, match=rf"^Calling '.*:{factory}{re.escape(fragment)}$"):
        build_model(f"{factories}:{factory}")


def test_arch_file_exiting_at_import(tmp_path):
    path = tmp_path / "quits.py"
    path.write_text("import sys\nsys.exit('bye')\n")
    with pytest.raises(ArchError, match=r"^Importing architecture file '.*quits\.py' called sys\.exit\('bye'\)"):
        build_model(f"{path}:build")
    weights = tmp_path / "w.pt"
    torch.save(TinyNet().state_dict(), weights)
    assert_one_line_error(run_cli("analyze", weights, "--arch", f"{path}:build", "--json", cwd=tmp_path),
                          "called sys.exit")


# --- 3. tampered dpruner checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A real pruned checkpoint of the digits VGG (what `dpruner prune --ratio 2x` writes) and its contents."""
    from dpruner.methods.api import prune

    loaded = load_checkpoint(SAMPLE)
    plans = [prune(loaded.model, torch.randn(1, 1, 8, 8), ratio=r).plan for r in (2.0, 1.5)]
    path = tmp_path_factory.mktemp("pruned") / "small.pt"
    save_checkpoint(path, loaded.model, arch=loaded.arch, num_classes=loaded.num_classes,
                    input_shape=loaded.input_shape, plan=[*loaded.plan, *plans], meta=loaded.meta)
    return path


def first_module_keep(obj):
    plan = obj["plan"][0]
    name = next(n for n, keep in plan["modules"].items() if "out" in keep)
    return plan["modules"][name]


def tamper_out(value_of):
    def edit(obj):
        keep = first_module_keep(obj)
        keep["out"] = value_of(keep["out"])
    return edit


TAMPERS = {
    "index-out-of-range": (tamper_out(lambda out: [*out[:-1], 10**6]), "index 1000000, outside"),
    "negative-index": (tamper_out(lambda out: [-1, *out[1:]]), "index -1, outside"),
    "duplicate-index": (tamper_out(lambda out: [out[0], *out[:-1]]), "repeats an index"),
    "index-wrong-type": (tamper_out(lambda out: [0.5, *out[1:]]), "not an integer index"),
    "indices-a-string": (tamper_out(lambda out: "0,1,2"), "not a list of indices"),
    "unknown-module": (lambda o: o["plan"][0]["modules"].update(nope={"out": [0]}), "modules['nope'] names a module"),
    "unknown-role": (lambda o: first_module_keep(o).update(sideways=[0]), "has role 'sideways'"),
    "bad-param": (lambda o: o["plan"][0].update(params={"features.0.nope": {"dim": 0, "keep": [0]}}),
                  "names a parameter the model does not have"),
    "bad-pad": (lambda o: o["plan"][0].update(pads=[{"owner": "features", "order": -1, "pair": 0, "before": 0,
                                                     "after": 0}]), "pads[0]['order'] must be a non-negative"),
    "plan-version": (lambda o: o["plan"][0].update(version=7), "plan version 7 is not supported"),
    "plan-a-string": (lambda o: o.update(plan="rm -rf /"), "pruning plan of type str"),
    "plan-of-strings": (lambda o: o.update(plan=["a"]), "pruning plan of type list, not a list of plans"),
    "meta-a-list": (lambda o: o.update(meta=[1, 2]), "holds meta of type list"),
    "shape-a-string": (lambda o: o.update(input_shape="abc"), "stores the input shape 'abc'"),
    "shape-zero": (lambda o: o.update(input_shape=[1, 0, 8, 8]), "not 3 to 5 positive integers"),
    "shape-huge": (lambda o: o.update(input_shape=[1, 1, 10**5, 10**5]), "DPRUNER_MAX_INPUT_ELEMENTS"),
    "state_dict-missing": (lambda o: o.pop("state_dict"), "without a state_dict"),
    "state_dict-value": (lambda o: o["state_dict"].update(extra="text"), "holding a str, not a tensor"),
    "version-a-string": (lambda o: o.update(dpruner_checkpoint="1"), "format version is '1', not a number"),
    "arch-a-number": (lambda o: o.update(arch=42), "stores its architecture as 42"),
    "num_classes-negative": (lambda o: o.update(num_classes=-3), "num_classes as -3"),
    "num_classes-huge": (lambda o: o.update(num_classes=10**12), "more than the"),
}


def tampered(pruned, tmp_path, name):
    obj = torch.load(pruned, weights_only=True)
    TAMPERS[name][0](obj)
    path = tmp_path / f"{name}.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_checkpoint_is_one_checkpoint_error(pruned, tmp_path, name):
    path = tampered(pruned, tmp_path, name)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert TAMPERS[name][1] in message and f"'{path}'" in message and "\n" not in message


def test_second_plan_is_named(pruned, tmp_path):
    obj = torch.load(pruned, weights_only=True)
    obj["plan"][1]["modules"]["nope"] = {"out": [0]}
    torch.save(obj, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match=r"does not fit its architecture \(plan 2 of 2: modules\['nope'\]"):
        load_checkpoint(tmp_path / "p.pt")


def test_untampered_pruned_checkpoint_still_loads(pruned):
    loaded = load_checkpoint(pruned)
    assert len(loaded.plan) == 2 and loaded.input_shape == (1, 1, 8, 8)


@pytest.mark.parametrize("name", ["index-out-of-range", "negative-index", "plan-a-string", "meta-a-list",
                                  "shape-a-string", "state_dict-missing"])
def test_tampered_checkpoint_cli(pruned, tmp_path, name):
    path = tampered(pruned, tmp_path, name)
    assert_one_line_error(run_cli("analyze", path, "--json", cwd=tmp_path), TAMPERS[name][1])


# --- 4. messages: code in pickles, empty dicts -----------------------------------------------------------------

class Planted:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_files(tmp_path):
    marker = tmp_path / "PWNED"
    payload = {"w": torch.zeros(2), "x": Planted(marker)}
    zip_path, legacy, raw, inst = (tmp_path / n for n in ("zip.pt", "legacy.pt", "raw4.pt", "inst.pt"))
    torch.save(payload, zip_path, pickle_protocol=2)
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    raw.write_bytes(pickle.dumps(Planted(marker), protocol=4))  # STACK_GLOBAL, which torch's unpickler rejects
    inst.write_bytes(b"\x80\x02(X" + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode()
                     + b"ios\nsystem\n.")  # INST: import and call in one opcode
    return marker, [zip_path, legacy, raw, inst]


def test_pickled_code_is_named_never_run(tmp_path):
    marker, paths = malicious_files(tmp_path)
    for path in paths:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert "pickled Python objects (here posix.system)" in message or "(here os.system)" in message, message
        assert "--trust-checkpoint" in message and "truncated" not in message
    assert not marker.exists()


def test_pickled_code_cli(tmp_path):
    marker, paths = malicious_files(tmp_path)
    assert_one_line_error(run_cli("analyze", paths[0], "--json", cwd=tmp_path), "posix.system", "--trust-checkpoint")
    assert not marker.exists()


def test_unparseable_pickle_is_truncated_or_corrupt(tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(b"\x80\x02}q\x00(X\x05\x00\x00\x00ab")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_empty_dict(tmp_path):
    torch.save({}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match=r"holds an empty dict; dpruner reads"):
        load_checkpoint(tmp_path / "e.pt")


# --- 5. torch version -----------------------------------------------------------------------------------------

def test_old_torch_is_refused(tmp_path, monkeypatch):
    torch.save(TinyNet().state_dict(), tmp_path / "w.pt")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(CheckpointError, match=r"torch 2\.5\.1\+cpu is older than 2\.6.*CVE-2025-32434.*upgrade torch"):
        load_checkpoint(tmp_path / "w.pt")
    for ok in ("2.6.0", "2.10.1", "3.0.0a0"):
        check_torch_version(ok)


def test_legacy_format_still_loads(tmp_path):
    net = TinyNet().eval()
    torch.save(net.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "legacy.pt", arch="tests.conftest:tiny_net")
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in net.state_dict().items())


def test_unsupported_pickle_protocol_is_not_called_corrupt(tmp_path):
    path = tmp_path / "p4.pt"
    torch.save(TinyNet().state_dict(), path, pickle_protocol=4)
    with pytest.raises(CheckpointError, match="pickle features that safe loading does not support.*--trust-checkpoint"):
        load_checkpoint(path, arch="tests.conftest:tiny_net")
    assert load_checkpoint(path, arch="tests.conftest:tiny_net", trust_checkpoint=True).source_format == "state_dict"
