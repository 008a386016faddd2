"""Render a report document (compare.build_report) as rows, then as a Rich table or a compact Markdown table."""

from __future__ import annotations


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for factor, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}"
    return f"{n:.0f}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def rows(doc: dict) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, ratio) rows; before/ratio are '-' for a one-model report."""
    before, after, ratios = doc.get("before") or {}, doc["after"], doc.get("ratios") or {}
    out = [
        ("params", _count(before.get("params")), _count(after["params"]), _x(ratios.get("params"))),
        ("MACs", _count(before.get("macs")), _count(after["macs"]), _x(ratios.get("macs"))),
        (".pt file", _size((before.get("file_bytes") or {}).get("pt")), _size(after["file_bytes"]["pt"]),
         _x((ratios.get("file_bytes") or {}).get("pt"))),
        (".onnx file", _size((before.get("file_bytes") or {}).get("onnx")), _size(after["file_bytes"]["onnx"]),
         _x((ratios.get("file_bytes") or {}).get("onnx"))),
    ]
    for runtime, per in after["latency_ms"].items():
        for batch, lat in per.items():
            ref = ((before.get("latency_ms") or {}).get(runtime) or {}).get(batch)
            speed = ((ratios.get("speedup") or {}).get(runtime) or {}).get(batch)
            eff = ((ratios.get("speedup_per_macs") or {}).get(runtime) or {}).get(batch)

            def cell(x):
                return "-" if x is None else f"{x['median']:.2f} ms (p90 {x['p90']:.2f}, n={x['runs']})"
            ratio = "-" if speed is None else f"{speed:.2f}x" + ("" if eff is None else f" ({eff:.2f} of MACs)")
            out.append((f"{runtime} batch {batch}", cell(ref), cell(lat), ratio))
    for runtime, per in (after.get("peak_forward_bytes") or {}).items():
        for batch, value in per.items():
            ref = ((before.get("peak_forward_bytes") or {}).get(runtime) or {}).get(batch)
            ratio = ((ratios.get("peak_forward_bytes") or {}).get(runtime) or {}).get(batch)
            out.append((f"{runtime} peak memory, batch {batch}", _size(ref), _size(value), _x(ratio)))
    for split, acc in (after.get("accuracy") or {}).items():
        ref = (before.get("accuracy") or {}).get(split)
        delta = "-" if ref is None else f"{100 * (acc - ref):+.2f} pt"
        out.append((f"top-1 {split}", "-" if ref is None else f"{100 * ref:.2f}%", f"{100 * acc:.2f}%", delta))
    return out


def with_int8(doc: dict, base: list[tuple]) -> list[tuple]:
    """Add the int8 model's column (and its ratio against the before model, else the float model) to `rows`."""
    q = doc.get("int8")
    if not q:
        return base
    model, ratio = q["model"], q.get("ratios_vs_before") or q["ratios_vs_float"]
    cells = {"params": (_count(model["params"]), _x(ratio.get("params"))),
             "MACs": (_count(model["macs"]), _x(ratio.get("macs"))),
             ".onnx file": (_size(model["file_bytes"]["onnx"]), _x((ratio.get("file_bytes") or {}).get("onnx")))}
    for batch, lat in (model["latency_ms"].get("onnxruntime") or {}).items():
        speed = ((ratio.get("speedup") or {}).get("onnxruntime") or {}).get(batch)
        cells[f"onnxruntime batch {batch}"] = (f"{lat['median']:.2f} ms (p90 {lat['p90']:.2f}, n={lat['runs']})",
                                               "-" if speed is None else f"{speed:.2f}x")
    for split, acc in (model.get("accuracy") or {}).items():
        delta = ((ratio.get("accuracy_delta") or {}).get(split))
        cells[f"top-1 {split}"] = (f"{100 * acc:.2f}%", "-" if delta is None else f"{100 * delta:+.2f} pt")
    return [(*row, *cells.get(row[0], ("-", "-"))) for row in base]


def headers(doc: dict) -> tuple[str, ...]:
    if doc.get("int8"):
        vs = "before" if doc["int8"].get("ratios_vs_before") else "float"
        return ("", "before", "after", "ratio", "after int8", f"int8 ratio (vs {vs})")
    return ("", "before", "after", "ratio")


def verification_line(doc: dict) -> str | None:
    v, onnx = doc.get("verification"), doc.get("onnx")
    if not v:
        return None
    status = "passed" if v["passed"] else "FAILED"
    where = "random + real data" if v["real_data"] else "random inputs"
    head = f"ONNX ({onnx['exporter']}, opset {onnx['opset']}" + (f", {onnx['simplifier']}" if onnx.get("simplifier") else "") + ")" if onnx else "ONNX"
    rule = f"atol {v['atol']:g}" + (f" + rtol {v['rtol']:g} x max|output|" if v.get("rtol") else "")
    held = {"abs": "; the absolute bound held", "abs+rel": "; held by the relative part"}.get(v.get("held"), "")
    outputs = v.get("outputs") or []
    names = f" on {len(outputs)} outputs ({', '.join(o['name'] for o in outputs)})" if len(outputs) > 1 else ""
    return (f"{head} verification {status}{names}: max abs diff {v['max_abs_diff']:.2e} ({rule}{held}), "
            f"max rel diff {v['max_rel_diff']:.2e}, top-1 agreement {100 * v['top1_agreement']:.2f}% over "
            f"{v['samples']} samples ({where}; batches {', '.join(map(str, v['batch_sizes']))}) in onnxruntime "
            f"{v['provider']}." + (f" Failed: {v['failure']}." if v.get("failure") else "")
            + (f" Both runtimes produce the same {v['nonfinite']['torch']} non-finite outputs (NaN/inf)."
               if v.get("nonfinite_agree") and (v.get("nonfinite") or {}).get("torch") else ""))


def int8_line(doc: dict) -> str | None:
    """One line on the int8 check (`export --int8`): agreement and accuracy against the float model."""
    q = doc.get("int8")
    if not q or not q.get("check"):
        return None
    c, st = q["check"], q["settings"]
    return (f"INT8 ({st['format']}, {st['weights']} weights, {st['activations']} on {st['calib_samples']} training "
            f"images, onnxruntime {st['onnxruntime']}) check {'passed' if c['passed'] else 'FAILED'}: top-1 "
            f"{100 * c['int8_accuracy']:.2f}% vs {100 * c['float_accuracy']:.2f}% in float32 on the {c['split']} "
            f"split ({c['samples']} images; drop {100 * c['drop']:.2f} pt, allowed {100 * c['max_drop']:g}), "
            f"top-1 agreement {100 * c['top1_agreement']:.2f}%.")


def int8_lines(doc: dict) -> list[str]:
    line = int8_line(doc)
    return ["", line] if line else []


def program_line(doc: dict) -> str | None:
    """One line on the torch.export program (`export --torch`): where, its batch, and its verification."""
    program = doc.get("torch_export")
    if not program:
        return None
    v = program["verification"]
    status = "passed" if v["passed"] else "FAILED"
    where = "random + real data" if v["real_data"] else "random inputs"
    return (f"torch.export program ({_size(program['file_bytes'])}, "
            f"{'dynamic' if program['dynamic_batch'] else 'static'} batch) verification {status} after "
            f"torch.export.load: max abs diff {v['max_abs_diff']:.2e}, top-1 agreement "
            f"{100 * v['top1_agreement']:.2f}% over {v['samples']} samples ({where})."
            + (f" Failed: {v['failure']}." if v.get("failure") else ""))


def footer(doc: dict) -> str:
    env = doc["environment"]
    return (f"Latency: median and p90 of timed runs after warm-up, {env['threads']} intra-op threads, torch "
            f"{env['torch']}, onnxruntime {env['onnxruntime']}, {env['machine']}. Ratio column for latency: "
            "speedup (speedup / MACs reduction; 1.00 = all the promised gain).")


def markdown(doc: dict, title: str = "dpruner report") -> str:
    """A compact table for a pull-request comment."""
    cols = headers(doc)
    lines = [f"### {title}", "", ("| " + " | ".join(cols) + " |").replace("|  |", "| |"),
             "|---" + "|---:" * (len(cols) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in with_int8(doc, rows(doc))]
    lines += int8_lines(doc)
    lines += gate_lines(doc)
    extra = [verification_line(doc), program_line(doc), footer(doc)]
    lines += [""] + [f"{line}" for line in extra if line]
    return "\n".join(lines) + "\n"


def gate_lines(doc: dict) -> list[str]:
    """The --require gates as a Markdown table; a failed gate is marked in bold so a reviewer sees it first."""
    gates = doc.get("gates") or []
    if not gates:
        return []
    failed = sum(not g["passed"] for g in gates)
    head = f"**{failed} of {len(gates)} gates FAILED**" if failed else f"All {len(gates)} gates passed"
    out = ["", head, "", "| gate | measured | result |", "|---|---:|---|"]
    for g in gates:
        value = "not measured" if g["value"] is None else f"{g['value']:.4g} ({g['where']})"
        out.append(f"| `{g['gate']}` | {value} | {'pass' if g['passed'] else '**FAIL**'} |")
    return out


def rich_table(doc: dict, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header in headers(doc):
        table.add_column(header, justify="left" if not header else "right")
    for row in with_int8(doc, rows(doc)):
        table.add_row(*row)
    return table
