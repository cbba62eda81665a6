"""The contracts between the core and plugins: plain records and ``typing.Protocol`` classes.

Nothing here imports torch or transformers, so ``lorakit check`` stays fast. Heavy objects
(tokenizers, models, configs) are typed ``Any`` at this boundary.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import attrs

ROLES = ("system", "user", "assistant", "tool")
SPLITS = ("train", "val", "test")


@attrs.frozen
class ToolCall:
    """A function call an assistant turn makes: the tool's ``name``, its ``arguments`` (a JSON
    object) and an optional call ``id`` (which a ``tool`` message's ``tool_call_id`` answers)."""

    name: str
    arguments: Mapping[str, Any] = attrs.field(factory=dict)
    id: str = ""

    def to_json(self) -> dict[str, Any]:
        """The OpenAI / transformers form chat templates read."""
        out: dict[str, Any] = {"id": self.id} if self.id else {}
        out.update(type="function", function={"name": self.name, "arguments": dict(self.arguments)})
        return out


@attrs.frozen
class Message:
    """One turn. ``role`` is ``system``, ``user``, ``assistant`` or ``tool`` (a tool's result).

    An assistant turn may carry ``tool_calls`` (its ``content`` may then be empty) and
    ``reasoning_content`` (its thinking, rendered by templates that have a place for it); a
    ``tool`` turn may name the call it answers (``tool_call_id``) and the tool (``name``).
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning_content: str | None = None
    tool_call_id: str = ""
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        """The message as chat templates and the split files hold it (optional keys only when
        set, so a plain turn is ``{"role", "content"}``)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_json() for c in self.tool_calls]
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


@attrs.frozen
class Example:
    """One normalized training example.

    Exactly one of ``messages`` (a conversation) or ``text`` (raw completion text) is set.
    ``meta`` holds ``source`` (where it came from: file and line), ``tags`` and optional ``split``.
    ``tools`` (conversations only) lists the functions the assistant may call, each
    ``{"type": "function", "function": {"name", "description", "parameters": JSON schema}}``;
    the chat template renders them and every tool call is checked against them.

    A preference pair is a conversation whose last message is the *chosen* assistant turn, with
    ``rejected`` set: the assistant turn that loses against it after the same prompt
    (``messages[:-1]``). SFT trains on ``messages`` (the chosen side) as on any conversation.

    An unpaired example (KTO) is a conversation whose last message is the assistant's answer,
    with ``label`` set: True when that answer is desirable, False when it is undesirable. SFT
    trains only on the desirable ones (the undesirable are dropped and counted).
    """

    id: str
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    meta: Mapping[str, Any] = attrs.field(factory=dict)
    tools: tuple[Mapping[str, Any], ...] | None = None
    rejected: tuple[Message, ...] | None = None
    label: bool | None = None

    @property
    def prompt(self) -> tuple[Message, ...]:
        """The conversation before its last turn (a pair's shared prompt)."""
        return (self.messages or ())[:-1]

    @property
    def rejected_messages(self) -> tuple[Message, ...] | None:
        """The whole rejected conversation: the prompt, then the rejected turn."""
        return None if self.rejected is None else (*self.prompt, *self.rejected)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            out["messages"] = [m.to_json() for m in self.messages]
        if self.tools is not None:
            out["tools"] = [dict(t) for t in self.tools]
        if self.text is not None:
            out["text"] = self.text
        if self.rejected is not None:
            out["rejected"] = [m.to_json() for m in self.rejected]
        if self.label is not None:
            out["label"] = self.label
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
    # The model's Hugging Face Hub id ("org/name") when it is one, for the model card's
    # ``base_model``; "" for a local folder (never a cache path).
    hub_id: str = ""


class SourceContext(Protocol):
    """What the core hands a data source while it reads."""

    recipe_dir: Path

    def reject(self, reason: str, where: str, fix: str) -> None:
        """A bad record: raises ``DataError`` (``[data] on_error = "fail"``, the default), or
        counts it as skipped with its reason and returns (``on_error = "skip"``)."""

    def note(self, key: str, value: Any) -> None:
        """A fact about what the source read, for the data report (``data_report.json``
        ``sources_info``): a dataset's fingerprint, revision, row count. JSON data."""


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

    def render_prompt(
        self,
        messages: Sequence[Message],
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render a conversation up to and including the assistant header (for generation),
        with the example's ``tools`` as ``render`` shows them (passed only when the example has
        tools; a layout with no place for them raises ``DataError``)."""
        ...

    def end_of_turn(self, tokenizer: Any) -> str:
        """The text of the token that ends an assistant turn (generation stops there)."""
        ...


@runtime_checkable
class ModelSource(Configured, Protocol):
    def resolve(self) -> ModelRef:
        """Return a loadable reference; raise ``ModelError`` with a fix when that is impossible."""
        ...

    # Optional capabilities: :class:`FindsTokenizer`, :class:`ReadsModelConfig`.


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

    # Optional capabilities: :class:`FinishesLoading`, :class:`DescribesMemory`,
    # :class:`ComputeDtypeSwitch`.


DtypeName = Literal["fp32", "bf16", "fp16"]  # the dtypes recipes name (besides "auto")


# Optional capabilities. A plugin has one by defining its methods (no base class to inherit);
# the core asks with ``isinstance(plugin, Capability)``, and mypy checks a plugin written
# against them (``x: FinishesLoading = MyBackend(...)``). ``tests/test_plugin_contracts.py``
# checks the built-in plugins against each.


@runtime_checkable
class FinishesLoading(Protocol):
    """Optional for a quant backend: fix a model after ``from_pretrained``.

    Called on every model loaded with the backend's ``load_kwargs`` (training, baseline, eval,
    generate, export), before anything else touches it; for what a quantization library needs
    done after loading.
    """

    def finish_loading(self, model: Any, device: str) -> Any:
        """Return the model, finished (usually the same object)."""
        ...


@runtime_checkable
class DescribesMemory(Protocol):
    """Optional for a quant backend or a PEFT method: what `lorakit plan` needs to predict
    memory without loading anything. Without it, ``plan`` says the plugin cannot be planned.

    * quant backend: ``weights`` ("nf4", "fp4", "int8" or "none"), ``double_quant`` (bool) and
      ``dtype`` ("auto", "fp32", "bf16", "fp16");
    * PEFT method: ``r`` (int), ``targets`` ("all-linear" or a list of module names) and
      ``dora`` (bool).
    """

    def memory_spec(self) -> dict[str, Any]: ...


@runtime_checkable
class ComputeDtypeSwitch(Protocol):
    """Optional for a quant backend: the recipe's compute dtype setting, and the same backend
    computing in another dtype.

    A run records the compute dtype it trained in (``auto`` is bf16 on one CPU, fp32 on
    another); ``eval``, ``generate`` and ``export`` use this to load the model exactly as it
    was trained, and export's parity check to evaluate the trained weights in fp32 arithmetic.
    ``lorakit launch-check`` compares the setting with accelerate's mixed precision.
    """

    @property
    def dtype_setting(self) -> tuple[str, str]:
        """``(key, value)``: the backend's option that sets the compute dtype (its name under
        ``[quant]``) and its value ("auto", "fp32", "bf16" or "fp16")."""
        ...

    def with_compute_dtype(self, name: DtypeName) -> QuantBackend:
        """This backend with its compute dtype set to ``name``."""
        ...


@runtime_checkable
class FindsTokenizer(Protocol):
    """Optional for a model source: a local folder with the model's ``tokenizer.json``, found
    cheaply (no download, no conversion), so ``lorakit check`` counts tokens without torch."""

    def tokenizer_folder(self) -> tuple[Path | None, str]:
        """``(folder or None, note)``; the note says why there is no folder yet."""
        ...


@runtime_checkable
class UsesRecipeFolder(Protocol):
    """Optional for a plugin whose options name files: the core hands it the recipe file's
    folder after building it, so a relative path means the same wherever lorakit runs (as
    data source paths do: ``SourceContext.recipe_dir``)."""

    def use_recipe_folder(self, folder: Path) -> None: ...


@runtime_checkable
class ReadsModelConfig(Protocol):
    """Optional for a model source: the model's config.json as a dict (or the same keys from
    GGUF metadata), without loading weights, for `lorakit plan`."""

    def model_config(self) -> dict[str, Any]:
        """Raise ``ModelError`` when even the config cannot be had (no Hub, not cached)."""
        ...


@runtime_checkable
class HasSystemPrompt(Protocol):
    """Optional for a formatter: the system prompt it inserts into a conversation without
    one (None: none). An export records it, so the exported model is prompted as trained."""

    @property
    def system_prompt(self) -> str | None: ...


@runtime_checkable
class PeftMethod(Configured, Protocol):
    def peft_config(self) -> Any:
        """Return a ``peft.PeftConfig`` for ``get_peft_model``."""
        ...

    # Optional capability: :class:`DescribesMemory`.


@runtime_checkable
class LoraInitOptions(Protocol):
    """Optional capability of a PEFT method's *options*: how a LoRA adapter starts and trains
    beyond its ``LoraConfig`` (``lorakit.lora_init``, ``lorakit.lora_plus``)."""

    @property
    def init(self) -> str:
        """default, gaussian, pissa, olora, loftq or eva."""
        ...

    @property
    def eva_batches(self) -> int:
        """eva: training micro-batches whose activations set the init."""
        ...

    @property
    def lora_plus_ratio(self) -> float:
        """LoRA+: B's learning rate over A's; 0 for one learning rate."""
        ...


@runtime_checkable
class ChecksCombinations(Protocol):
    """Optional capability of a plugin's options: settings it cannot train with the recipe's
    [quant] and [train], each a problem naming the keys (the recipe reports them all)."""

    def combination_problems(self, *, quantizes: bool, quant: str, objective: str) -> list[str]:
        """``quantizes``: whether the [quant] plugin quantizes the base; ``quant`` its name;
        ``objective``: ``[train].objective``."""
        ...


@runtime_checkable
class Metric(Configured, Protocol):
    """Scores one split. A metric is one of two kinds, and ``kind`` says which: a
    :class:`LossMetric` (``kind = "loss"``) or a :class:`GenerationMetric`
    (``kind = "generation"``); each has its own ``score`` signature, and the core calls the one
    ``kind`` names.

    ``higher_is_better`` lets reports mark which direction is an improvement. Generation metrics
    return a fraction in [0, 1]; reports show them as points (x 100).
    """

    @property
    def kind(self) -> str: ...

    @property
    def higher_is_better(self) -> bool: ...


@runtime_checkable
class LossMetric(Metric, Protocol):
    """``kind = "loss"``: a function of the split's token losses."""

    def score(self, nll_sum: float, n_tokens: int) -> float:
        """``nll_sum``: the summed negative log-likelihood of every supervised token of the
        split; ``n_tokens``: their count (token-weighted, so the result does not depend on the
        eval batch size)."""
        ...


@runtime_checkable
class GenerationMetric(Metric, Protocol):
    """``kind = "generation"``: scores greedy completions against reference answers."""

    def score(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        """``predictions``: the greedy completion of every prompt; ``references``: the
        reference answers (the last assistant turn); ``stopped``: whether each completion ended
        with the template's end-of-turn."""
        ...


METRIC_KINDS = {"loss": LossMetric, "generation": GenerationMetric}


@attrs.frozen
class LogRun:
    """What an experiment logger is told when a run starts (see :class:`ExperimentLogger`).

    ``params`` is the resolved recipe (every setting, defaults filled in, as in
    ``resolved.json``); ``versions`` the training stack's package versions (``versions.json``).
    ``resumed`` is true when the run continues from a checkpoint: a logger that can continue
    its earlier record should. ``resumed_from`` is that checkpoint's step: the interrupted
    attempt may have logged the steps after it, which the run trains and logs again (a
    logger that can drop the earlier ones should; TensorBoard's ``purge_step`` does).
    """

    name: str
    run_dir: Path
    output_dir: Path
    params: Mapping[str, Any]
    data_fingerprint: str
    versions: Mapping[str, str | None]
    config_hash: str
    resumed: bool = False
    resumed_from: int | None = None


@runtime_checkable
class ExperimentLogger(Configured, Protocol):
    """Sends a run's parameters, metrics and files to an experiment tracker.

    The core calls these methods on rank 0 only, from a thread of the logger's own (so a slow
    tracker never slows training), in this order: ``start`` once, ``log_metrics`` per logged
    step, ``log_final`` once after evaluation, ``log_artifacts`` once, ``finish`` once. Any
    exception is caught by the core: it warns once and calls the logger no more.
    """

    # Optional capability: :class:`RequiresModules`.

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


@runtime_checkable
class RequiresModules(Protocol):
    """Optional for an experiment logger: the modules it imports, each with how to install
    it. A recipe that picks the logger is refused, with that fix, when one is missing (checked
    with ``importlib.util.find_spec``: nothing is imported)."""

    @property
    def requires(self) -> Mapping[str, str]: ...
