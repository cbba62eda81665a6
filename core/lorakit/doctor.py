"""``lorakit doctor``: has an upgrade of the training stack changed what training computes?

A library upgrade can change the loss without a word (a loss scaled by 1/accumulation, a chat
template rendered differently, another LoRA init). The doctor trains the embedded
SmolLM2-135M-Instruct for 3 seeded steps through ``lorakit run`` itself, pinned so that the
result depends on the software and not on the machine (CPU, fp32 compute, one thread, no
dropout), and compares what it measured with the golden record shipped for this lorakit
version (``golden/doctor-<version>.json``, written by ``lorakit doctor --write-golden``):

- the loss and grad norm of each step, within a relative :data:`TOLERANCE`;
- the token ids of a fixed text and of a fixed conversation as lorakit renders it for training
  (ids and labels), exactly;
- the adapter's sha256, as information only: CPUs of other kinds round the last bits of fp32
  sums differently, so the hash differs where the numbers agree.

When something differs it names the packages whose versions differ from the record's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from lorakit import __version__
from lorakit.errors import RunError
from lorakit.evaluation.numbers import nan_for_null
from lorakit.rundir import json_text, read_json, stack_versions, version_changes

GOLDEN_DIR = Path(__file__).parent / "golden"

# Relative tolerance on losses and grad norms. In fp32 on a CPU the same software gives results
# that differ only in how sums are rounded (the kernels split them by the CPU's vector width and
# the thread count): the micro-run on 2 threads instead of 1, same CPU, moved losses and grad
# norms by up to 1.3e-6 relative (and changed the adapter's hash). A change of what is computed
# (loss scaling, masking, template, LoRA init, optimizer) moves them by 1e-3 or more (a loss
# scaled by 1/accumulation: by half). 1e-4 leaves ~100x room on each side.
TOLERANCE = 1e-4

STEPS = 3
PROBE_TEXT = 'lorakit doctor: Grüße, 3.14 € — {"qty": [1, 2]}\n\tdef f(x): return x ** 2  # 東京'

_ITEMS = ("cup", "lamp", "chair", "pencil", "kettle", "scarf")
_COLORS = ("red", "blue", "green", "black", "white", "yellow")

RECIPE = """\
# lorakit doctor's micro-run: the embedded model, 3 seeded steps, fp32 on one CPU thread
[model]
plugin = "smollm2-135m-instruct"

[quant]
plugin = "none"
dtype = "fp32"

[peft]
plugin = "lora"
r = 8
alpha = 16
dropout = 0.0

[train]
seed = 7
max_steps = {steps}
per_device_train_batch_size = 2
learning_rate = 1e-3
logging_steps = 1
save_steps = 1000
max_length = 128
device = "cpu"
threads = 1

[eval]
metrics = ["eval_loss"]
baseline = false
max_examples = 0
canary = false

[data]
val_fraction = 0.0
test_fraction = 0.0

[[data.sources]]
plugin = "chat_jsonl"
path = "chat.jsonl"

[output]
dir = "{runs}"
name = "doctor"
"""


def conversations() -> list[dict[str, Any]]:
    """The micro-run's training data: 6 fixed chat records (item, color, quantity as JSON)."""
    out = []
    for i in range(2 * STEPS):
        item, color, qty = _ITEMS[i], _COLORS[(i * 5) % 6], i + 2
        answer = json.dumps({"item": item, "color": color, "qty": qty})
        out.append(
            {
                "id": f"doctor-{i}",
                "messages": [
                    {"role": "user", "content": f"Extract: I bought {qty} {color} {item}s."},
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    return out


def micro_run(log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the micro-run in a throwaway folder; return its record."""
    from lorakit import runner
    from lorakit.data.pipeline import DataReport, load_splits
    from lorakit.data.rows import tokenize_examples
    from lorakit.modeling import load_tokenizer, resolve_model
    from lorakit.rundir import RunDir
    from lorakit.session import open_session

    with tempfile.TemporaryDirectory(prefix="lorakit-doctor-") as tmp:
        folder = Path(tmp)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in conversations())
        (folder / "chat.jsonl").write_text(lines, encoding="utf-8")
        (folder / "doctor.toml").write_text(
            RECIPE.format(steps=STEPS, runs=folder / "runs"), encoding="utf-8"
        )
        session = open_session(folder / "doctor.toml")
        recipe, components = session.recipe, session.components
        captured = io.StringIO()
        started = time.perf_counter()
        try:
            with contextlib.redirect_stderr(captured):  # the run's progress lines
                run = runner.run_recipe(recipe, components)
        finally:
            RunDir.release_all()
            if log is not None:
                for line in captured.getvalue().splitlines():
                    log(line)
        seconds = time.perf_counter() - started
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().split("\n") if x]
        steps = [  # null: a NaN or infinity (metrics.jsonl writes them so), compared as NaN
            {"step": r["step"], **nan_for_null({"loss": r["loss"], "grad_norm": r["grad_norm"]})}
            for r in rows
            if "loss" in r and "grad_norm" in r
        ]
        adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
        tokenizer = load_tokenizer(resolve_model(components.model_source, recipe.model.name))
        splits = load_splits(components.sources, recipe.data, recipe.recipe_dir)
        first = sorted(splits.train, key=lambda e: e.id)[:1]
        (row,) = tokenize_examples(
            first, components.formatter, tokenizer, recipe.train.max_length, "error", DataReport()
        )
    return {
        "lorakit": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": "embedded SmolLM2-135M-Instruct, LoRA r=8, fp32, CPU, 1 thread, seed 7",
        "steps": steps,
        "adapter_sha256": hashlib.sha256(adapter).hexdigest(),
        "probe_text": PROBE_TEXT,
        "probe_ids": list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]),
        "chat_ids": list(row.input_ids),
        "chat_labels": list(row.labels),
        "versions": stack_versions(),
        "seconds": round(seconds, 2),
    }


@attrs.frozen
class Verdict:
    """What the micro-run found against its golden record: ``problems`` (each a line; none:
    the stack computes what it did), ``notes`` (information only) and the package versions
    that differ from the record's (name -> (recorded, installed))."""

    golden: Path
    problems: list[str]
    notes: list[str]
    changed_versions: dict[str, tuple[Any, Any]]

    @property
    def ok(self) -> bool:
        return not self.problems


def compare(record: dict[str, Any], golden: dict[str, Any], golden_path: Path) -> Verdict:
    problems: list[str] = []
    notes: list[str] = []
    if golden.get("lorakit") != record["lorakit"]:
        notes.append(
            f"no golden record for lorakit {record['lorakit']}: compared with "
            f"{golden_path.name} (lorakit {golden.get('lorakit')}); lorakit's own changes count"
        )
    mine, theirs = record["steps"], golden.get("steps", [])
    if len(mine) != len(theirs):
        problems.append(f"{len(mine)} logged steps, the record has {len(theirs)}")
    for now, then in zip(mine, theirs, strict=False):
        for key in ("loss", "grad_norm"):
            a, b = float(now[key]), float(then[key])
            if not math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=0.0):
                problems.append(
                    f"step {now['step']} {key}: {a:.7g}, the record has {b:.7g} "
                    f"(relative difference {abs(a - b) / max(abs(b), 1e-30):.1e}, "
                    f"tolerance {TOLERANCE:g})"
                )
    for key, what in (
        ("probe_ids", "token ids of the probe text"),
        ("chat_ids", "token ids of the rendered conversation"),
        ("chat_labels", "labels of the rendered conversation"),
    ):
        if record[key] != golden.get(key):
            problems.append(f"{what} differ: {_first_difference(record[key], golden.get(key))}")
    if record["adapter_sha256"] != golden.get("adapter_sha256"):
        notes.append(
            "the adapter's sha256 differs from the record's (information only: other CPUs round "
            "fp32 sums differently in the last bits)"
        )
    changed = version_changes(golden.get("versions", {}), record["versions"])
    return Verdict(golden_path, problems, notes, changed)


def _first_difference(mine: list[int], theirs: Any) -> str:
    if not isinstance(theirs, list):
        return "the record has none"
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            return f"first at position {i}: {a}, the record has {b}"
    return f"{len(mine)} tokens, the record has {len(theirs)}"


def golden_for(version: str = __version__, folder: Path | None = None) -> Path:
    """This version's golden record, else the newest one shipped; RunError when none is."""
    folder = folder or GOLDEN_DIR
    exact = folder / f"doctor-{version}.json"
    if exact.is_file():
        return exact
    shipped = sorted(folder.glob("doctor-*.json"), key=lambda p: _version_key(p.stem[7:]))
    if not shipped:
        raise RunError(
            f"no golden record in {folder}",
            fix="in a lorakit source checkout, run `lorakit doctor --write-golden` on a known-good "
            "stack and commit the file",
        )
    return shipped[-1]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def read_golden(path: Path) -> dict[str, Any]:
    return read_json(path)


def write_golden(record: dict[str, Any], folder: Path | None = None) -> Path:
    folder = folder or GOLDEN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"doctor-{record['lorakit']}.json"
    path.write_text(json_text(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
