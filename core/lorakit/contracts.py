"""The contracts between the core and plugins: plain records and ``typing.Protocol`` classes.

Nothing here imports torch or transformers, so ``lorakit check`` stays fast. Heavy objects
(tokenizers, models, configs) are typed ``Any`` at this boundary.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import attrs

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")


@attrs.frozen
class Message:
    role: str
    content: str


@attrs.frozen
class Example:
    """One normalized training example.

    Exactly one of ``messages`` (a conversation) or ``text`` (raw completion text) is set.
    ``meta`` holds ``source`` (where it came from: file and line), ``tags`` and optional ``split``.
    """

    id: str
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    meta: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            out["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        if self.text is not None:
            out["text"] = self.text
        out["meta"] = dict(self.meta)
        return out


@attrs.frozen
class Segment:
    """A piece of rendered text; ``supervised`` pieces are the ones the loss is computed on."""

    text: str
    supervised: bool = False


@attrs.frozen
class Rendered:
    """An example rendered by a formatter: segments whose concatenation is the model input."""

    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


@attrs.frozen
class ModelRef:
    """What a model source resolved to: something ``from_pretrained`` accepts."""

    path: str
    revision: str | None = None
    trust_remote_code: bool = False
    # A short human description for logs and model cards ("local:/x", "hub:org/name@rev").
    label: str = ""


class SourceContext(Protocol):
    """What the core hands a data source while it reads."""

    recipe_dir: Path

    def reject(self, reason: str, where: str, fix: str) -> None:
        """A bad record: raises ``DataError`` (``[data] on_error = "fail"``, the default), or
        counts it as skipped with its reason and returns (``on_error = "skip"``)."""


class Configured(Protocol):
    """What every plugin factory has: an ``Options`` attrs class (its recipe options) and a
    constructor taking an instance of it. ``Options`` is a plain class attribute
    (``Options = MyOptions``); the protocols spell such attributes as read-only properties so a
    plain assignment satisfies them."""

    @property
    def Options(self) -> type: ...

    def __init__(self, options: Any) -> None: ...


@runtime_checkable
class DataSource(Configured, Protocol):
    def read(self, ctx: SourceContext) -> Iterator[Example]:
        """Yield normalized examples; raise ``DataError`` (file:line and fix) on bad input."""
        ...


@runtime_checkable
class Formatter(Configured, Protocol):
    def render(self, example: Example, tokenizer: Any) -> Rendered:
        """Render a full training example, marking supervised segments."""
        ...

    def render_prompt(self, messages: Sequence[Message], tokenizer: Any) -> str:
        """Render a conversation up to and including the assistant header (for generation)."""
        ...

    def end_of_turn(self, tokenizer: Any) -> str:
        """The text of the token that ends an assistant turn (generation stops there)."""
        ...


@runtime_checkable
class ModelSource(Configured, Protocol):
    def resolve(self) -> ModelRef:
        """Return a loadable reference; raise ``ModelError`` with a fix when that is impossible."""
        ...

    # Optional: ``tokenizer_folder() -> (Path | None, note)``: a local folder with the model's
    # tokenizer.json, found cheaply (no download, no conversion), for torch-free `lorakit check`;
    # ``note`` says why there is none yet.
    # Optional: ``model_config() -> dict``: the model's config.json as a dict (or the same keys
    # from GGUF metadata), without loading weights, for `lorakit plan`; raise ModelError when
    # even the config cannot be had (no Hub, not cached).


@runtime_checkable
class QuantBackend(Configured, Protocol):
    """How the frozen base model is loaded. ``quantizes`` says whether the weights it loads are
    quantized (False for a backend that only picks a dtype): merge and export ask it, never the
    backend's name."""

    @property
    def quantizes(self) -> bool: ...

    def load_kwargs(self, device: str) -> dict[str, Any]:
        """Extra ``from_pretrained`` kwargs (``quantization_config``, ``dtype``) for ``device``."""
        ...

    def compute_dtype(self, device: str) -> Any:
        """The torch dtype that matmuls run in on ``device``."""
        ...

    def prepare_for_training(self, model: Any, gradient_checkpointing: bool) -> Any:
        """Prepare a freshly loaded base model for adapter training; return it."""
        ...

    # Optional: ``finish_loading(model, device) -> model``: called on every model loaded with
    # this backend's ``load_kwargs`` (training, baseline, eval, generate), before anything else
    # touches it. For fixes a quantization library needs after ``from_pretrained``.
    # Optional: ``memory_spec() -> dict`` for `lorakit plan`: ``weights`` ("nf4", "fp4", "int8"
    # or "none"), ``double_quant`` (bool) and ``dtype`` ("auto", "fp32", "bf16", "fp16").


DtypeName = Literal["fp32", "bf16", "fp16"]  # the dtypes recipes name (besides "auto")


@runtime_checkable
class ComputeDtypeSwitch(Protocol):
    """Optional for a quant backend: the same backend computing in another dtype.

    A run records the compute dtype it trained in (``auto`` is bf16 on one CPU, fp32 on
    another); ``eval``, ``generate`` and ``export`` use this to load the model exactly as it
    was trained, and export's parity check to evaluate the trained weights in fp32 arithmetic.
    """

    def with_compute_dtype(self, name: DtypeName) -> QuantBackend:
        """This backend with its compute dtype set to ``name``."""
        ...


@runtime_checkable
class PeftMethod(Configured, Protocol):
    def peft_config(self) -> Any:
        """Return a ``peft.PeftConfig`` for ``get_peft_model``."""
        ...

    # Optional: ``memory_spec() -> dict`` for `lorakit plan`: ``r``, ``targets`` ("all-linear"
    # or module names) and ``dora`` (bool).


@runtime_checkable
class Metric(Configured, Protocol):
    """Scores one split. ``kind`` says which inputs ``score`` takes.

    * ``kind = "loss"``: ``score(nll_sum, n_tokens) -> float`` gets the summed negative
      log-likelihood of every supervised token of the split and their count (token-weighted, so
      the result does not depend on the eval batch size).
    * ``kind = "generation"``: ``score(predictions, references, stopped) -> float`` gets the
      greedy completion of every prompt, the reference answer (the last assistant turn) and
      whether each completion ended with the template's end-of-turn.

    ``higher_is_better`` lets reports mark which direction is an improvement. Generation metrics
    return a fraction in [0, 1]; reports show them as points (x 100).
    """

    @property
    def kind(self) -> str: ...

    @property
    def higher_is_better(self) -> bool: ...

    def score(self, *args: Any, **kwargs: Any) -> float:
        """Return the metric for one split (see the class docstring for the arguments)."""
        ...


@attrs.frozen
class LogRun:
    """What an experiment logger is told when a run starts (see :class:`ExperimentLogger`).

    ``params`` is the resolved recipe (every setting, defaults filled in, as in
    ``resolved.json``); ``versions`` the training stack's package versions (``versions.json``).
    ``resumed`` is true when the run continues from a checkpoint: a logger that can continue
    its earlier record should.
    """

    name: str
    run_dir: Path
    output_dir: Path
    params: Mapping[str, Any]
    data_fingerprint: str
    versions: Mapping[str, str | None]
    config_hash: str
    resumed: bool = False


@runtime_checkable
class ExperimentLogger(Configured, Protocol):
    """Sends a run's parameters, metrics and files to an experiment tracker.

    The core calls these methods on rank 0 only, from a thread of the logger's own (so a slow
    tracker never slows training), in this order: ``start`` once, ``log_metrics`` per logged
    step, ``log_final`` once after evaluation, ``log_artifacts`` once, ``finish`` once. Any
    exception is caught by the core: it warns once and calls the logger no more.
    """

    # Optional: ``requires = {"module": "how to install it"}``: modules the logger imports;
    # a recipe that picks it is refused, with that fix, when one is missing (checked with
    # ``importlib.util.find_spec``, nothing is imported).

    def start(self, run: LogRun) -> None:
        """Open the record and log ``run.params``, the data fingerprint and versions."""
        ...

    def log_metrics(self, step: int, metrics: Mapping[str, Any], wall_time: float) -> None:
        """One logged training step: the Trainer's record (loss, learning_rate, grad_norm,
        eval_loss, epoch, peak_memory_gb...) at optimizer step ``step``; values may be None."""
        ...

    def log_final(self, step: int, metrics: Mapping[str, float]) -> None:
        """Final evaluation, keys ``final/<base|tuned>/<split>/<metric>``."""
        ...

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """Files and folders the run produced (adapter, reports, plot)."""
        ...

    def finish(self, status: str) -> None:
        """Close the record; ``status`` is ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``
        (interrupted)."""
        ...
