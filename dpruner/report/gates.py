"""CI gates over a report document: `speedup>=1.3`, `accuracy_drop<=1pt`, ... parsed, checked against the
report's measurements, and written as JUnit XML, so a pipeline can refuse a model that regressed."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dpruner.errors import InputError

OPERATORS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
             ">": lambda a, b: a > b}
# metric -> (kind, what it is). Kinds fix the unit a threshold may carry: x (ratio), pt (accuracy points), ms, %.
METRICS = {
    "macs": ("ratio", "MACs reduction, before / after"),
    "params": ("ratio", "parameter reduction, before / after"),
    "size": ("ratio", ".pt file size reduction, before / after"),
    "onnx_size": ("ratio", ".onnx file size reduction, before / after"),
    "speedup": ("ratio", "latency speedup, before / after (onnxruntime at the smallest --batches size unless "
                         "named: speedup.torch, speedup.onnxruntime.8)"),
    "efficiency": ("ratio", "speedup / MACs reduction (1.0: the latency gain is all the MACs promised)"),
    "latency": ("ms", "the after model's median latency in ms (runtime and batch as for speedup)"),
    "accuracy": ("points", "the after model's top-1 in percent (test split, else val; accuracy.val to choose)"),
    "accuracy_drop": ("points", "before top-1 minus after top-1, in points (split as for accuracy)"),
}
UNITS = {"ratio": ("", "x"), "points": ("", "pt", "%"), "ms": ("", "ms")}
_PATTERN = re.compile(r"^\s*([a-z_]+)((?:\.[A-Za-z0-9_]+)*)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*([a-z%]*)\s*$")


@dataclass(frozen=True)
class Gate:
    """One requirement on a report: `metric[.runtime[.batch]] op threshold[unit]`."""

    text: str
    metric: str
    qualifiers: tuple[str, ...]
    op: str
    threshold: float
    unit: str

    def to_json(self) -> dict:
        return {"gate": self.text, "metric": self.metric, "qualifiers": list(self.qualifiers), "op": self.op,
                "threshold": self.threshold, "unit": self.unit}


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float | None  # None: the report holds no such measurement
    where: str  # what exactly was read (e.g. "onnxruntime batch 1", "test split")
    passed: bool
    reason: str  # one sentence, for the log and the JUnit failure message

    def to_json(self) -> dict:
        return {**self.gate.to_json(), "value": self.value, "where": self.where, "passed": self.passed,
                "reason": self.reason}


def parse_gate(text: str) -> Gate:
    """Parse `speedup>=1.3`, `accuracy_drop <= 1pt`, `speedup.torch.8>=1.2x`, `latency<=5ms`."""
    match = _PATTERN.match(text)
    if not match:
        raise InputError(f"--require takes METRIC OP VALUE such as 'speedup>=1.3' or 'accuracy_drop<=1pt', got "
                         f"'{text}'.")
    metric, quals, op, number, unit = match.groups()
    if metric not in METRICS:
        raise InputError(f"--require: unknown metric '{metric}' in '{text}'; choose from {', '.join(METRICS)}.")
    try:
        threshold = float(number)
    except ValueError:
        raise InputError(f"--require: '{number}' in '{text}' is not a number.") from None
    if not math.isfinite(threshold):
        raise InputError(f"--require: the threshold in '{text}' must be finite.")
    kind = METRICS[metric][0]
    if unit not in UNITS[kind]:
        allowed = " or ".join(repr(u) for u in UNITS[kind] if u)
        raise InputError(f"--require: '{metric}' is measured in {kind}; its threshold takes {allowed} (or no unit), "
                         f"not '{unit}' in '{text}'.")
    qualifiers = tuple(q for q in quals.split(".") if q)
    _check_qualifiers(metric, qualifiers, text)
    return Gate(text.strip(), metric, qualifiers, op, threshold, unit)


def _check_qualifiers(metric: str, qualifiers: tuple[str, ...], text: str) -> None:
    if metric in ("speedup", "efficiency", "latency"):
        if len(qualifiers) > 2 or (qualifiers and qualifiers[0] not in ("torch", "onnxruntime")) or (
                len(qualifiers) == 2 and not qualifiers[1].isdigit()):
            raise InputError(f"--require: '{text}' names {metric}[.torch|.onnxruntime[.BATCH]], e.g. "
                             f"'{metric}.onnxruntime.1'.")
    elif metric in ("accuracy", "accuracy_drop"):
        if len(qualifiers) > 1 or (qualifiers and qualifiers[0] not in ("test", "val", "train")):
            raise InputError(f"--require: '{text}' names {metric}[.test|.val], e.g. '{metric}.val'.")
    elif qualifiers:
        raise InputError(f"--require: '{metric}' takes no qualifier, got '{text}'.")


def needs(gates: list[Gate]) -> dict[str, bool]:
    """What the gates need measured: accuracy (--data), latency, a before model (a ratio)."""
    return {"accuracy": any(g.metric in ("accuracy", "accuracy_drop") for g in gates),
            "latency": any(g.metric in ("speedup", "efficiency", "latency") for g in gates),
            "before": any(g.metric != "accuracy" and g.metric != "latency" for g in gates)}


def check_measurable(gates: list[Gate], *, data: bool, latency: bool, before: bool, batches: tuple[int, ...]) -> None:
    """Refuse, before any slow work, a gate the run will not measure."""
    need = needs(gates)
    if need["accuracy"] and not data:
        raise InputError("--require on accuracy needs --data to measure it.")
    if need["latency"] and not latency:
        raise InputError("--require on speedup, efficiency or latency needs latency measured (drop --no-latency).")
    if need["before"] and not before:
        names = sorted({g.metric for g in gates if g.metric not in ("accuracy", "latency")})
        raise InputError(f"--require on {', '.join(names)} compares two models: give --baseline.")
    for gate in gates:
        if len(gate.qualifiers) == 2 and int(gate.qualifiers[1]) not in batches:
            raise InputError(f"--require '{gate.text}' reads batch {gate.qualifiers[1]}, which --batches "
                             f"({','.join(map(str, batches))}) does not time.")


def _latency_key(doc: dict, gate: Gate) -> tuple[str, str]:
    runtime = gate.qualifiers[0] if gate.qualifiers else "onnxruntime"
    per = (doc.get("after") or {}).get("latency_ms", {}).get(runtime) or {}
    batch = gate.qualifiers[1] if len(gate.qualifiers) == 2 else (min(per, key=int) if per else "1")
    return runtime, batch


def _split(accuracy: dict | None, gate: Gate) -> str | None:
    if gate.qualifiers:
        return gate.qualifiers[0]
    if not accuracy:
        return None
    return "test" if "test" in accuracy else "val" if "val" in accuracy else next(iter(accuracy))


def measured(doc: dict, gate: Gate) -> tuple[float | None, str]:
    """The value a gate reads from a report document (schema of compare.build_report), and from where."""
    ratios, after, before = doc.get("ratios") or {}, doc.get("after") or {}, doc.get("before") or {}
    metric = gate.metric
    if metric in ("macs", "params"):
        return ratios.get(metric), "before / after"
    if metric in ("size", "onnx_size"):
        return (ratios.get("file_bytes") or {}).get("pt" if metric == "size" else "onnx"), "before / after"
    if metric in ("speedup", "efficiency", "latency"):
        runtime, batch = _latency_key(doc, gate)
        where = f"{runtime} batch {batch}"
        if metric == "latency":
            cell = (after.get("latency_ms", {}).get(runtime) or {}).get(batch)
            return (cell or {}).get("median"), where
        table = ratios.get("speedup" if metric == "speedup" else "speedup_per_macs") or {}
        return (table.get(runtime) or {}).get(batch), where
    split = _split(after.get("accuracy"), gate)
    if split is None:
        return None, "no accuracy measured"
    now = (after.get("accuracy") or {}).get(split)
    if metric == "accuracy":
        return (None if now is None else 100 * now), f"{split} split"
    ref = (before.get("accuracy") or {}).get(split)
    return (None if now is None or ref is None else 100 * (ref - now)), f"{split} split"


def _fmt(value: float, gate: Gate) -> str:
    kind = METRICS[gate.metric][0]
    suffix = {"ratio": "x", "points": " pt" if gate.metric == "accuracy_drop" else "%", "ms": " ms"}[kind]
    return f"{value:.3g}{suffix}" if kind != "points" else f"{value:.2f}{suffix}"


def evaluate_gates(doc: dict, gates: list[Gate]) -> list[GateResult]:
    """Check every gate against the report; a gate whose value is missing fails (it was not shown to hold)."""
    out = []
    for gate in gates:
        value, where = measured(doc, gate)
        if value is None:
            out.append(GateResult(gate, None, where, False, f"{gate.text}: not measured ({where})."))
            continue
        # compared at 10 significant digits: 100 * (0.92 - 0.905) is 1.5000000000000013 in binary floating point,
        # and a 1.5-point drop must pass `accuracy_drop<=1.5pt`
        passed = OPERATORS[gate.op](float(f"{value:.10g}"), gate.threshold)
        verdict = "holds" if passed else "fails"
        reason = (f"{gate.text} {verdict}: {gate.metric} is {_fmt(value, gate)} ({where}), required "
                  f"{gate.op} {_fmt(gate.threshold, gate)}.")
        out.append(GateResult(gate, float(value), where, passed, reason))
    return out


def junit_xml(results: list[GateResult], *, suite: str = "dpruner gates") -> str:
    """JUnit XML: one test case per gate, a <failure> for each that failed (the format CI systems display)."""
    import xml.etree.ElementTree as ET

    failures = sum(not r.passed for r in results)
    root = ET.Element("testsuites", {"name": "dpruner", "tests": str(len(results)), "failures": str(failures)})
    node = ET.SubElement(root, "testsuite", {"name": suite, "tests": str(len(results)), "failures": str(failures),
                                             "errors": "0", "skipped": "0"})
    for result in results:
        case = ET.SubElement(node, "testcase", {"classname": "dpruner.gates", "name": result.gate.text})
        if not result.passed:
            failure = ET.SubElement(case, "failure", {"message": result.reason, "type": "GateFailed"})
            failure.text = result.reason
        else:
            out = ET.SubElement(case, "system-out")
            out.text = result.reason
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
