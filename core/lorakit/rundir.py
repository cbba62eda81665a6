"""The run folder ``<output.dir>/<name>/`` and everything in it.

Layout::

    .lorakit-claim       the owner's pid (empty once it ended); it holds an flock on it while it runs
    recipe.toml          the recipe as given, credentials in values masked (never rewritten)
    run.json             lorakit version, overrides, start/resume history, config hash, batch
                         (processes, per-device batch, accumulation, global batch), compute
                         dtype; DPO/KTO: when the reference is computed (``reference_logps``)
    resolved.json        every setting with defaults filled in
    versions.json        versions of the training stack
    data_report.json     counts per source, skips and drops with reasons, data fingerprint
    data/splits/         train/val/test.jsonl (lorakit prepare, and every run)
    metrics.jsonl        one JSON object per logged step (loss, lr, grad norm, eval loss); a
                         resume keeps it up to its checkpoint (the rest: metrics.attempt-N.jsonl)
    checkpoints/checkpoint-N/   trainer checkpoints; LORAKIT_COMPLETE (step, run id) written last
    adapter/             the final adapter + tokenizer (+ chat template)

A run folder that holds ``run.json`` belongs to a run: it is never overwritten. Resume it
with ``--resume-from-checkpoint auto`` or choose another ``output.name``; one that left nothing
to continue (no checkpoint, no adapter) may be started again (docs/reliability.md).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lorakit import __version__
from lorakit.checkpoints import MARKER, checkpoint_problem
from lorakit.errors import RunError
from lorakit.safe_files import make_folder, not_writable, refuse_links, write_text
from lorakit.secrets import mask

COMPLETE = MARKER  # written last in each checkpoint: "step N" and "run <run_id>"
SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")  # data/splits/, by prepare and run
BASELINE = "baseline"  # the base model's scores (evaluation.evaluate.BASELINE_DIR)
# Claim files this process holds locked (path -> open descriptor), while its run runs.
_HELD: dict[str, int] = {}
# Settings a resume may change (prefixes of resolved keys): how long to train, how often to
# save, log and evaluate, and everything about evaluation and where runs live.
RESUME_SAFE = (
    "train.max_steps",
    "train.num_train_epochs",
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "train.eval_steps",
    "train.per_device_eval_batch_size",
    "train.dataloader_num_workers",
    "train.threads",
    "eval.",
    "output.",
    "log.",  # where metrics are sent, not what is trained
)
STACK = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "pluggy",
    "attrs",
)


def null_for_nan(data: Any) -> Any:
    """``data`` with every NaN and infinity (in dicts, lists and tuples) as None: JSON has no
    such numbers, and ``json.dumps`` would write the bare tokens ``NaN`` / ``Infinity`` that
    other JSON readers (jq, JavaScript, most languages) refuse. A reader of lorakit's files
    takes null where a number belongs as "not a number" (``evaluation.numbers.nan_for_null``)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: null_for_nan(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [null_for_nan(v) for v in data]
    return data


def json_text(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``data`` that is valid JSON: non-finite numbers written as null."""
    return json.dumps(null_for_nan(data), allow_nan=False, **kwargs)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a killed process never leaves half a file), secrets masked
    (``lorakit.secrets.mask``: overrides and settings may carry URL credentials); NaN and
    infinities as null (:func:`null_for_nan`)."""
    text = json_text(data, indent=2, sort_keys=False, default=str)
    write_text(path, mask(text) + "\n")


def no_adapter_fix(run_dir: Path) -> str:
    """The fix for a run folder without its final adapter: resume it when a checkpoint was
    kept (its training stopped before the end), else train it."""
    run = RunDir(run_dir)
    done = run.complete_checkpoints() if run.exists() else []
    if done:
        return (
            f"its training stopped after {done[-1].name}, before the adapter was saved: continue "
            "it with `lorakit run RECIPE --resume-from-checkpoint auto` (RECIPE: the file it "
            f"was started from; {run.recipe} is a copy of it), then use the run folder"
        )
    return "train it first with `lorakit run RECIPE`"


def recorded_merge(started: Mapping[str, Any]) -> int:
    """The tokens up to which a run merges a step's micro-batches, as its run.json (``started``)
    recorded at the start; 0 where it does not (or started before lorakit merged them)."""
    batch = started.get("batch")
    merged = batch.get("merged_micro_batch_tokens", 0) if isinstance(batch, Mapping) else 0
    return merged if isinstance(merged, int) and merged > 0 else 0


def metric_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``. A line that is not a JSON object is left out:
    an append cut short (a full disk, a killed process) leaves half a line, and training
    carries on after it, so the file is read around it rather than refused."""
    out = []
    # "\n" alone ends a line: str.splitlines() would also cut at U+2028, U+2029 or U+0085,
    # which JSON strings may hold raw
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object lorakit wrote into a run folder (run.json, resolved.json, reports, an
    adapter's lorakit.json). One that is not valid JSON, or not an object (edited by hand, or
    damaged), is a ``RunError`` naming the file, not a traceback wherever it is read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        problem = f"is not valid JSON ({exc})"
    else:
        if isinstance(data, dict):
            return data
        problem = f"holds a JSON {type(data).__name__}, not an object"
    raise RunError(
        f"{path} {problem}",
        fix="lorakit writes this file itself: restore it from a copy, or delete the run folder "
        "and train again",
    )


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    recipe = property(lambda self: self.path / "recipe.toml")
    run_json = property(lambda self: self.path / "run.json")
    resolved = property(lambda self: self.path / "resolved.json")
    versions = property(lambda self: self.path / "versions.json")
    data_report = property(lambda self: self.path / "data_report.json")
    splits = property(lambda self: self.path / "data" / "splits")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter = property(lambda self: self.path / "adapter")
    claim = property(lambda self: self.path / ".lorakit-claim")

    def exists(self) -> bool:
        return self.run_json.is_file()

    def start(
        self,
        recipe_text: str,
        resolved: Mapping[str, Any],
        overrides: list[str],
        config_hash: str,
        recipe_path: Path,
        batch: Mapping[str, Any] | None = None,
        reference_logps: str | None = None,
        compute_dtype: str | None = None,
    ) -> bool:
        """Claim the folder for a new run, atomically; refuse if a run already lives there.

        The claim is an exclusive flock on ``.lorakit-claim``, held for the life of the process:
        of any runs started together, or restarting the same abandoned folder together, exactly
        one gets it. A folder whose run left nothing to continue (no checkpoint,
        no adapter: it failed before step 1, or was killed before its first checkpoint) may be
        started again once its owner process is gone, with this recipe or a corrected one;
        returns True then. A checkpoint folder without its marker counts as nothing (the save
        was cut short); it is removed. run.json keeps the earlier attempt in its history and its
        metrics.jsonl is kept as metrics.attempt-N.jsonl.
        """
        self.refuse_a_link()
        self.refuse_foreign()
        make_folder(self.path, run_folder=self.path)
        before = self._lock()
        restarted = before is not None or self.exists()
        try:
            refuse_links(self.path)  # a folder started again: nothing planted to write through
            if restarted:
                self._check_restartable()
        except BaseException:
            self._unlock(before)
            raise
        self._write_pid()
        if restarted and self.metrics.is_file():  # the dead attempt's log stays, renamed
            os.replace(self.metrics, _free_name(self.metrics))
        if restarted:  # saves the dead attempt left unfinished: never complete, never resumed
            for unfinished in self._unfinished_after(None):
                shutil.rmtree(unfinished)
        write_text(self.recipe, mask(recipe_text))  # no secret on disk, never through a link
        write_json(self.resolved, resolved)
        write_json(self.versions, stack_versions())
        event = {
            "event": "restart" if restarted else "start",
            "time": _now(),
            "overrides": overrides,
        }
        history = []
        run_id = uuid.uuid4().hex  # named in each checkpoint's marker: a copied one is foreign
        if restarted and self.exists():
            earlier = read_json(self.run_json)
            run_id = earlier.get("run_id") or run_id
            history = [
                *earlier["history"],
                {"event": "stopped before a checkpoint", "config_hash": earlier.get("config_hash")},
            ]
        write_json(
            self.run_json,
            {
                "lorakit_version": __version__,
                "run_id": run_id,
                "config_hash": config_hash,
                "recipe_path": str(recipe_path),
                # processes, per-device batch, accumulation, global batch (distributed.batch_plan)
                "batch": dict(batch or {}),
                # DPO/KTO: when the reference is computed ("every_step"/"once"); a resume keeps it
                **({"reference_logps": reference_logps} if reference_logps else {}),
                # what the recipe's dtype (often "auto") resolved to on the machine that started
                **({"compute_dtype": compute_dtype} if compute_dtype else {}),
                "history": [*history, event],
            },
        )
        return restarted

    def _lock(self) -> str | None:
        """Take the claim: an exclusive ``flock`` on ``.lorakit-claim``, held until the run ends
        (``release_all``) or the process dies, however it dies (the kernel drops it then). Of any number of
        processes that try at once, one gets it; the others get "in use". Returns what the claim
        held before (the pid of an earlier owner, now gone), or None for a new claim."""
        import fcntl
        import stat

        self.refuse_a_link()
        key = str(self.claim.resolve())
        if key in _HELD:  # this process took it before (an earlier attempt in-process)
            return str(_claim_owner(self.claim) or "") or None
        try:  # never through a planted link: the pid is written in place, truncating the file
            fd = os.open(self.claim, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # ELOOP: O_NOFOLLOW met a link
                refused = not_writable(exc, self.path)
                if refused is None:
                    raise
                raise refused from None
            raise self._foreign_claim("a symbolic link") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._foreign_claim("not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self._refuse_in_use(_claim_owner(self.claim))
        # The lock is the answer: no live lorakit holds this folder. The pid left in the file is
        # only a hint of who had it last, and may by now belong to an unrelated process.
        before = os.read(fd, 64).decode("utf-8", "replace").strip()
        _HELD[key] = fd
        return before or None

    def _write_pid(self) -> None:
        """Write this process's pid into the claim it holds (in place: the lock is on this file)."""
        fd = _HELD[str(self.claim.resolve())]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    @staticmethod
    def release_all() -> None:
        """Give up the claims this process holds (its run ended): the claim is emptied, so no
        pid names an owner, and the lock is dropped."""
        while _HELD:
            _, fd = _HELD.popitem()
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)

    def _unlock(self, before: str | None) -> None:
        """Give back a claim this process took but did not use, as it was."""
        fd = _HELD.pop(str(self.claim.resolve()), None)
        if before is None:
            self.claim.unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)

    def refuse_a_link(self) -> None:
        """A run folder that is a symbolic link would put the run outside ``output.dir``."""
        if self.path.is_symlink():
            raise RunError(
                f"run folder {self.path} is a symbolic link (to {os.readlink(self.path)}); "
                "lorakit writes runs only inside output.dir",
                fix="remove the link, or choose another output.name",
            )

    def foreign_files(self) -> list[Path]:
        """What this folder holds that no lorakit command wrote, when it is not a run's (no
        run.json, no claim): anything but what ``lorakit prepare`` writes (``data/splits/``
        with the split files) and the base model's scores a sweep copies in (``baseline/``).
        Empty for a folder that does not exist, and for any run's folder."""
        if not self.path.is_dir() or self.exists() or os.path.lexists(self.claim):
            return []
        foreign = []
        for entry in sorted(self.path.iterdir()):
            if entry.name == BASELINE and entry.is_dir() and not entry.is_symlink():
                continue
            if entry.name == "data" and entry.is_dir() and not entry.is_symlink():
                for inner in sorted(entry.iterdir()):
                    if inner.name != "splits" or not inner.is_dir() or inner.is_symlink():
                        foreign.append(inner)
                        continue
                    foreign += [f for f in sorted(inner.iterdir()) if not _split_file(f)]
                continue
            foreign.append(entry)
        return foreign

    def refuse_foreign(self) -> None:
        """An existing folder that is not a run's, nor one ``lorakit prepare`` made, holds
        someone's files: a run there would replace its recipe.toml or append to its
        metrics.jsonl, so it is refused before anything is written."""
        foreign = self.foreign_files()
        if not foreign:
            return
        refuse_links(self.path)  # a planted link is named as one, not as a stranger's file
        shown = ", ".join(str(p.relative_to(self.path)) for p in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise RunError(
            f"{self.path} is not a run folder: it holds files lorakit did not write ({shown}"
            f"{more}), and a run would write over them",
            where="output.name",
            fix=f"choose another output.name (e.g. output.name={self.path.name}-run), or move "
            "those files out of the folder",
        )

    def _foreign_claim(self, what: str) -> RunError:
        return RunError(
            f"{self.claim} is {what}, not a claim lorakit wrote; nothing was written through it",
            fix="remove it (it is not lorakit's), or choose another output.name",
        )

    def _refuse_in_use(self, owner: int | None) -> None:
        raise RunError(
            f"run folder {self.path} is in use by another lorakit process"
            + (f" (pid {owner})" if owner else ""),
            fix="wait for it to finish, or choose another output.name",
        )

    def nothing_to_continue(self) -> bool:
        """No complete checkpoint and no adapter: an attempt that left nothing a resume could
        use (a checkpoint without its marker is a save that was cut short)."""
        return not (self.complete_checkpoints() or self.adapter.exists())

    def _check_restartable(self) -> None:
        """Called holding the claim: may this folder's earlier attempt be started again?"""
        if not self.exists():
            return  # the last attempt died before it wrote run.json
        name = self.path.name
        if not self.nothing_to_continue():
            raise RunError(
                f"run folder {self.path} already holds a run",
                fix=f"resume it with --resume-from-checkpoint auto, or start a new one with "
                f"output.name={name}-2 (runs are never overwritten)",
            )

    def resume_changes(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """Settings that differ from the run's ``resolved.json``: those safe to change on resume
        (how long to train, how often to save, log and evaluate, what to evaluate) are returned as
        ``{key: [old, new]}``; any other change makes the resumed result meaningless and raises."""
        changed = self.changes(
            resolved,
            doing=f"resuming {self.path}",
            fix="resume with the settings the run started with (see its resolved.json); "
            "only how long to train and how often to save, log and evaluate may change; "
            "for anything else start a new run under another output.name",
        )
        self._check_new_length(changed, resolved)
        return changed

    def _check_new_length(self, changed: Mapping[str, Any], resolved: Mapping[str, Any]) -> None:
        """A new length under a schedule that depends on it is refused. With a linear (cosine,
        polynomial...) decay, or a warmup given as a ratio, the learning rate of every step
        already trained was set by the old length, so no resume can equal a run of the new
        length; continuing the old schedule would train the new steps at the rate it ended
        on (0). A constant schedule does not depend on the length and may be extended."""
        train = resolved.get("train", {})
        steps = changed.get("train.max_steps")
        epochs = changed.get("train.num_train_epochs")
        if steps is not None:
            key, (old, new) = "train.max_steps", steps
        elif epochs is not None and train.get("max_steps", -1) == -1:
            key, (old, new) = "train.num_train_epochs", epochs
        else:
            return
        schedule = train.get("lr_scheduler_type")
        warmup = train.get("warmup_ratio") or 0
        if schedule == "constant" or (schedule == "constant_with_warmup" and warmup == 0):
            return
        shape = f"the {schedule} learning-rate schedule" + (
            f" with warmup_ratio {warmup}" if warmup and schedule != "constant" else ""
        )
        raise RunError(
            f"resuming {self.path} with {key} {old!r} -> {new!r} under {shape}: the learning "
            f"rate of the steps already trained was set for {key} = {old!r}, so the result "
            f"could not equal a run of {new!r}",
            fix=f"keep {key}={old!r}, or start a new run with {key}={new!r} under another "
            f"name (e.g. output.name={self.path.name}-2); only a constant schedule "
            '(train.lr_scheduler_type = "constant") can be extended',
        )

    def changes(self, resolved: Mapping[str, Any], doing: str, fix: str) -> dict[str, Any]:
        """``{key: [old, new]}`` for settings that differ from ``resolved.json`` (the settings of
        the attempt that trained) and may differ (RESUME_SAFE); any other difference raises a
        RunError that starts with ``doing``."""
        before = flatten_keys(read_json(self.resolved)) if self.resolved.is_file() else {}
        if not before:
            return {}
        after = flatten_keys(resolved)
        changed = {
            k: [before.get(k), after.get(k)]
            for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)
        }
        refused = [k for k in changed if not k.startswith(RESUME_SAFE)]
        if refused:
            shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused)
            raise RunError(f"{doing} with changed settings: {shown}", fix=fix)
        return changed

    def record_resume(
        self,
        checkpoint: Path,
        overrides: list[str],
        changed: Mapping[str, Any] | None = None,
        batch: Mapping[str, Any] | None = None,
        compute_dtype: str | None = None,
    ) -> None:
        self._lock()  # a resume holds the claim too: two resumes of one run never both train
        self._write_pid()
        info = read_json(self.run_json)
        info["history"].append(
            {
                "event": "resume",
                "time": _now(),
                "checkpoint": str(checkpoint),
                "overrides": overrides,
                "changed": dict(changed or {}),
                "batch": dict(batch or {}),
                **({"compute_dtype": compute_dtype} if compute_dtype else {}),
                # versions.json stays the start's; what this resume trains with instead
                "versions_changed": {k: list(v) for k, v in self.version_changes().items()},
            }
        )
        write_json(self.run_json, info)

    def keep_metrics_until(self, step: int) -> Path | None:
        """A resume from the checkpoint of ``step`` continues the log from there: the earlier
        attempts' records after it (steps trained again now, and their summary) would be
        logged twice. The whole earlier log is kept as ``metrics.attempt-N.jsonl`` (nothing
        logged is lost) and ``metrics.jsonl`` keeps its records up to ``step``; returns the
        kept file, or None when nothing was past ``step``."""
        if not self.metrics.is_file():
            return None
        # "\n" alone ends a record, as metric_records reads them
        lines = self.metrics.read_text(encoding="utf-8", errors="replace").split("\n")
        lines = [ln for ln in lines if ln]
        kept = [ln for ln in lines if _logged_at_or_before(ln, step)]
        if len(kept) == len(lines):
            return None
        aside = _free_name(self.metrics)
        os.replace(self.metrics, aside)
        write_text(self.metrics, "".join(ln + "\n" for ln in kept))
        return aside

    def logged_loss_sum(self, step: int) -> float | None:
        """The summed training loss of steps 1..``step`` from ``metrics.jsonl``: each logged
        ``loss`` is the mean over the steps since the one logged before it. None when the
        logged losses do not cover exactly those steps (no loss logged at ``step`` itself,
        because logging_steps does not divide it, or records missing)."""
        records = metric_records(self.metrics) if self.metrics.is_file() else []
        losses = {
            r["step"]: float(r["loss"])
            for r in records
            if isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))
        }
        if step not in losses:
            return None
        total, before = 0.0, 0
        for at in sorted(k for k in losses if k <= step):
            total += losses[at] * (at - before)
            before = at
        return total

    def version_changes(self) -> dict[str, tuple[Any, Any]]:
        """Packages whose installed versions differ from the run's ``versions.json``."""
        if not self.versions.is_file():
            return {}
        return version_changes(read_json(self.versions), stack_versions())

    def version_note(self) -> str | None:
        """A line for a resume whose training stack is not the one the run started with."""
        changes = self.version_changes()
        if not changes:
            return None
        listed = ", ".join(f"{name} {then} -> {now}" for name, (then, now) in changes.items())
        return (
            f"note: the training stack changed since {self.path} started ({listed}); the "
            "resumed steps may not match an uninterrupted run (see lorakit doctor)"
        )

    def run_id(self) -> str | None:
        """The id each of this run's checkpoint markers names (None for runs older than it)."""
        value = read_json(self.run_json).get("run_id") if self.exists() else None
        return value if isinstance(value, str) else None

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints with a completeness marker, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for d in self.checkpoints.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and (d / COMPLETE).is_file():
                found.append((int(m.group(1)), d))
        return [d for _, d in sorted(found)]

    def _unfinished_after(self, newest: Path | None) -> list[Path]:
        """Checkpoint folders newer than ``newest`` (all, when None) without a marker, newest
        first: saves that a kill or a crash interrupted."""
        after = int(newest.name.rpartition("-")[2]) if newest is not None else -1
        found = []
        for d in self.checkpoints.iterdir() if self.checkpoints.is_dir() else ():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and int(m.group(1)) > after and not (d / COMPLETE).is_file():
                found.append((int(m.group(1)), d))
        return [d for _, d in sorted(found, reverse=True)]

    def resolve_checkpoint(
        self,
        spec: str,
        on_skip: Callable[[Path, str], None] | None = None,
        last_step: int | None = None,
    ) -> Path:
        """``auto`` -> the newest complete checkpoint of this run whose files read back (a
        damaged one is skipped, and ``on_skip`` told why); else an explicit folder, verified.
        ``last_step``: the run's new ``train.max_steps``; a checkpoint past it is skipped by
        ``auto`` and refused when named (its adapter has trained past the end).
        A run folder holding planted links is refused before anything in it is read."""
        refuse_links(self.path)
        if spec == "auto":
            if not self.exists():
                raise RunError(
                    f"nothing to resume: {self.path} holds no run",
                    fix="start the run without --resume-from-checkpoint",
                )
            done = self.complete_checkpoints()
            if on_skip is not None:
                for unfinished in self._unfinished_after(done[-1] if done else None):
                    on_skip(unfinished, f"no {COMPLETE} marker (its save was interrupted)")
            past = [d for d in done if last_step is not None and _step_of(d) > last_step]
            done = [d for d in done if d not in past]
            for later in reversed(past):
                if on_skip is not None:
                    on_skip(later, f"it is past train.max_steps = {last_step}")
            if past and not done:
                raise self._past_the_end(past[0], last_step)
            for candidate in reversed(done):
                problem = checkpoint_problem(candidate, self.run_id())
                if problem is None:
                    return candidate
                if on_skip is not None:
                    on_skip(candidate, problem)
            if self.nothing_to_continue():
                fix = (
                    "run it again without --resume-from-checkpoint: a run folder with no "
                    "complete checkpoint starts again"
                )
            else:
                fix = f"start a new run under another name, e.g. output.name={self.path.name}-2"
            raise RunError(f"{self.checkpoints} holds no complete, readable checkpoint", fix=fix)
        path = Path(spec)
        if not path.is_dir():
            raise RunError(
                f"checkpoint {path} does not exist", fix="pass a checkpoint-N folder or auto"
            )
        if path.resolve().parent != self.checkpoints.resolve():
            other = path.resolve().parent.parent
            raise RunError(
                f"checkpoint {path} belongs to the run in {other}, not to {self.path}",
                fix=f"resume that run with output.dir={str(other.parent)!r} "
                f"output.name={other.name!r} --resume-from-checkpoint auto (a resume continues "
                "the checkpoint's own run)",
            )
        if not (path / COMPLETE).is_file():  # before its contents: a save cut short is not
            raise RunError(  # "another run's" (no run id in a marker that is not there)
                f"checkpoint {path} is incomplete (no {COMPLETE} marker)",
                fix="the process was probably killed while saving; resume from an earlier checkpoint",
            )
        problem = checkpoint_problem(path, self.run_id())
        if problem is not None:
            raise RunError(
                f"checkpoint {path} is damaged: {problem}",
                fix="resume from an earlier checkpoint, or use --resume-from-checkpoint auto",
            )
        if last_step is not None and _step_of(path) > last_step:
            raise self._past_the_end(path, last_step)
        return path

    def _past_the_end(self, checkpoint: Path, last_step: int | None) -> RunError:
        """A checkpoint past the new ``train.max_steps``: resuming it would keep steps the run
        no longer has. The fix names the newest complete checkpoint at or below it, if any."""
        below = [d for d in self.complete_checkpoints() if _step_of(d) <= (last_step or 0)]
        if below:
            fix = (
                f"resume from {below[-1]} (the newest complete checkpoint at or below step "
                f"{last_step}; --resume-from-checkpoint auto picks it), or keep train.max_steps "
                f"at {_step_of(checkpoint)} or more"
            )
        else:
            fix = (
                f"no complete checkpoint is at or below step {last_step}: keep train.max_steps "
                f"at {_step_of(checkpoint)} or more, or train {last_step} steps as a new run "
                f"(output.name={self.path.name}-2)"
            )
        return RunError(
            f"checkpoint {checkpoint} is past train.max_steps = {last_step} (step "
            f"{_step_of(checkpoint)}): resuming it would keep an adapter trained past the end",
            fix=fix,
        )


def flatten_keys(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested table as ``{"train.learning_rate": 0.0002, ...}`` (lists are leaves)."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten_keys(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _logged_at_or_before(line: str, step: int) -> bool:
    """Whether a ``metrics.jsonl`` line is a record of ``step`` or earlier (a line cut short
    by a kill is not: it stays only in the attempt's file)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    at = record.get("step") if isinstance(record, dict) else None
    return isinstance(at, int) and not isinstance(at, bool) and at <= step


def _step_of(checkpoint: Path) -> int:
    """N of a ``checkpoint-N`` folder (its trainer_state.json is checked to agree)."""
    return int(checkpoint.name.rpartition("-")[2])


def _split_file(path: Path) -> bool:
    """A split file ``lorakit prepare`` writes (or its temporary, left by a kill)."""
    if path.is_symlink() or not path.is_file():
        return False
    return (
        path.name in SPLIT_FILES
        or re.fullmatch(r"\.(train|val|test)\.jsonl\.\d+\.tmp", path.name) is not None
    )


def _free_name(path: Path) -> Path:
    n = 1
    while (candidate := path.with_name(f"{path.stem}.attempt-{n}{path.suffix}")).exists():
        n += 1
    return candidate


def _claim_owner(claim: Path) -> int | None:
    try:
        return int(claim.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def stack_versions() -> dict[str, str | None]:
    from lorakit.catalog import installed_version

    out: dict[str, str | None] = {"lorakit": __version__}
    out.update({name: installed_version(name) for name in STACK})
    return out


def version_changes(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The packages whose versions differ between two ``versions.json`` records:
    ``{name: (before, after)}``, a package missing from one side as None, sorted by name."""
    names = sorted(set(before) | set(after))
    return {n: (before.get(n), after.get(n)) for n in names if before.get(n) != after.get(n)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
