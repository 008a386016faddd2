"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="Checkpoint file: a state_dict (with --arch), a dpruner checkpoint, or a pickled model (with --trust-checkpoint).", show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture of a state_dict: torchvision:NAME, path/to/file.py:factory or package.module:factory.")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", min=1, help="Passed to the architecture builder as num_classes.")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow full unpickling of the file. Unpickling can run arbitrary code: use only for files from a source you trust.")]
InputShapeOpt = Annotated[Optional[str], typer.Option("--input-shape", help="Example input as C,H,W (or N,C,H,W). Default: the checkpoint's, or 3,224,224 for torchvision models.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (logs go to stderr).")]
LeafOpt = Annotated[Optional[list[str]], typer.Option("--leaf", help="Treat this module class as one opaque op when tracing (package.module:Class or file.py:Class; repeatable): for blocks torch.fx cannot trace. Its channels are left alone.")]
RequireOpt = Annotated[Optional[list[str]], typer.Option("--require", help="A CI gate on the report, METRIC OP VALUE, e.g. 'speedup>=1.3', 'accuracy_drop<=1pt', 'macs>=2x', 'latency.torch.8<=20ms' (repeatable; metrics: macs, params, size, onnx_size, speedup, efficiency, latency, accuracy, accuracy_drop). A failed gate exits 1 with its reason; see docs/report.md.")]
JunitOpt = Annotated[Optional[Path], typer.Option("--junit", help="Also write the --require gates as JUnit XML (one test case per gate) for CI test reports.")]
