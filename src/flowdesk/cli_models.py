"""The ``flowdesk models`` commands for local classifiers and their versions:

* ``train TASK FILE [--text-column text] [--label-column label] [--out-of-scope-label L]``:
  train on a CSV or JSONL file of labelled examples, register the result as the task's
  next version, print the version and its held-out metrics;
* ``eval TASK FILE [--version V] [--json]``: accuracy, macro-F1, expected calibration
  error (15 bins) and, with an out-of-scope label, its precision and recall;
* ``predict TASK TEXT...``: answer texts with a version (default: the current one);
* ``list [--json]``: tasks, versions, metrics, current, canary and shadow versions;
* ``promote TASK VERSION``, ``rollback TASK``, ``canary TASK VERSION PERCENT``,
  ``shadow TASK VERSION|off``: change which version answers;
* ``ask TASK TEXT [--provider NAME] [--schema module:Model] [--config FILE] [--json]``:
  try a route of the gateway without writing a workflow, and print the answer (streamed
  as it is written) with its model, provider, tokens, latency and cost. Without
  ``--config`` (or ``$FLOWDESK_MODELS_CONFIG``) it asks the default gateway: the packaged
  SmolLM2, in process, for the task ``generate``.

They work on a models directory (``--models-dir``, default ``$FLOWDESK_MODELS_DIR``, else
``./flowdesk-models``), not on an app or database. The commands join the ``models`` group
that `flowdesk.cli_models_usage` adds (usage, budgets, flags, rollouts, drift), or add it
when it is not there; `flowdesk.cli` imports this module last.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, cast

import typer

import flowdesk.cli_models_usage  # noqa: F401  (adds the `models` group these commands join)
from flowdesk import errors
from flowdesk.cli import JsonOpt, _fail, cli

if TYPE_CHECKING:
    from flowdesk.models import registry as registry_mod
    from flowdesk.models import training as training_mod

HELP = (
    "Local classifiers (train, eval, predict, list, promote, rollback, canary, shadow); "
    "model usage and cost, budgets, route flags, rollouts and drift."
)


def _models_group() -> typer.Typer:
    for info in cli.registered_groups:
        if info.name == "models" and info.typer_instance is not None:
            info.typer_instance.info.help = HELP
            return info.typer_instance
    group = typer.Typer(help=HELP, no_args_is_help=True)
    cli.add_typer(group, name="models")
    return group


models_cli = _models_group()

DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        envvar="FLOWDESK_MODELS_DIR",
        help="The models directory (default: $FLOWDESK_MODELS_DIR, else ./flowdesk-models).",
    ),
]
TextColumnOpt = Annotated[
    str | None, typer.Option("--text-column", help="The column (or JSON field) with the text.")
]
LabelColumnOpt = Annotated[
    str | None, typer.Option("--label-column", help="The column (or JSON field) with the label.")
]


def _need_models() -> None:
    """Fail clearly when the models extra is missing (its modules are imported on use, so
    the rest of the command line works without scikit-learn)."""
    try:
        for name in ("joblib", "numpy", "scipy", "sklearn"):
            importlib.import_module(name)
    except ImportError as exc:
        _fail(
            f"local classifiers need the models extra ({exc.name} is missing): "
            "pip install 'flowdesk[models]'"
        )


def _registry(models_dir: Path | None) -> registry_mod.Registry:
    _need_models()
    from flowdesk.models import registry

    return registry.Registry(models_dir)


def _error(exc: errors.FlowdeskError) -> NoReturn:
    _fail(str(exc))


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _metrics_lines(metrics: dict[str, Any], oos: dict[str, Any] | None) -> list[str]:
    lines = [
        f"accuracy {_fmt(metrics.get('accuracy'))}  macro-F1 {_fmt(metrics.get('macro_f1'))}  "
        f"ECE {_fmt(metrics.get('ece'))}  (n = {metrics.get('n')})"
    ]
    if oos and oos.get("label") is not None:
        lines.append(
            f"out of scope ({oos['label']!r}): precision {_fmt(metrics.get('oos_precision'))}  "
            f"recall {_fmt(metrics.get('oos_recall'))}  threshold {_fmt(oos.get('threshold'))}"
        )
    return lines


@models_cli.command("train")
def train_cmd(
    task: Annotated[str, typer.Argument(help="The task name the classifier answers for.")],
    file: Annotated[Path, typer.Argument(help="Labelled examples: CSV (header row) or JSONL.")],
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    out_of_scope_label: Annotated[
        str | None,
        typer.Option(
            "--out-of-scope-label",
            help="The label meaning 'none of these': trained as a class when the data has "
            "it, and given to answers below the tuned confidence threshold.",
        ),
    ] = None,
    features: Annotated[
        str,
        typer.Option(help="auto (embeddings when installed), tfidf, or tfidf+embeddings."),
    ] = "auto",
    holdout: Annotated[float, typer.Option(help="The fraction held back to measure.")] = 0.2,
    svm_c: Annotated[float, typer.Option("--svm-c", help="The SVM's C.")] = 1.0,
    seed: Annotated[int, typer.Option(help="The random seed of the splits.")] = 0,
    models_dir: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a classifier on FILE and register it as TASK's next version."""
    _need_models()
    from flowdesk.models import training

    if features not in ("auto", "tfidf", "tfidf+embeddings"):
        _fail(f"--features {features!r}: use auto, tfidf or tfidf+embeddings")
    registry = _registry(models_dir)
    try:
        from flowdesk.models.registry import check_task_name

        check_task_name(task)  # a bad name fails before the training, not after it
        examples = training.load_examples(
            file, text_column=text_column or "text", label_column=label_column or "label"
        )
        if out_of_scope_label is not None and not out_of_scope_label.strip():
            _fail("--out-of-scope-label must not be empty")

        def progress(message: str) -> None:
            if not as_json:
                typer.echo(message, err=True)

        result = training.train(
            examples,
            features=cast("training_mod.FeatureChoice", features),
            out_of_scope_label=out_of_scope_label,
            holdout=holdout,
            c=svm_c,
            seed=seed,
            progress=progress,
        )
        version = registry.register(task, result.classifier, result.meta)
        state = registry.state(task)
    except errors.FlowdeskError as exc:
        _error(exc)
    meta = result.meta
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "task": task,
                    "version": version,
                    "current": state.current,
                    "features": meta["features"],
                    "n_examples": meta["n_examples"],
                    "n_train": meta["n_train"],
                    "n_heldout": meta["n_heldout"],
                    "labels": len(meta["labels"]),
                    "metrics": meta["metrics"],
                    "out_of_scope": meta["out_of_scope"],
                    "train_seconds": meta["train_seconds"],
                    "models_dir": str(registry.path),
                },
                indent=2,
            )
        )
        return
    typer.echo(
        f"{task} {version}: trained on {meta['n_train']} examples ({len(meta['labels'])} labels), "
        f"{meta['n_heldout']} held back; features {meta['features']}; "
        f"{meta['train_seconds']:.1f} s"
    )
    for line in _metrics_lines(meta["metrics"], meta["out_of_scope"]):
        typer.echo(f"held-out {line}")
    if state.current == version:
        typer.echo(f"{version} is the current version of {task}")
    else:
        typer.echo(
            f"{state.current} stays current; make {version} current with "
            f"`flowdesk models promote {task} {version}`"
        )


@models_cli.command("eval")
def eval_cmd(
    task: Annotated[str, typer.Argument(help="The task name.")],
    file: Annotated[Path, typer.Argument(help="Labelled examples: CSV (header row) or JSONL.")],
    version: Annotated[
        str | None, typer.Option(help="The version (default: the current one).")
    ] = None,
    text_column: TextColumnOpt = None,
    label_column: LabelColumnOpt = None,
    models_dir: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure a version on FILE. The columns default to those it was trained with."""
    _need_models()
    from flowdesk.models import training

    registry = _registry(models_dir)
    try:
        chosen = version or registry.state(task).current
        if chosen is None:
            _fail(f"{task} has no current version: name one with --version")
        info = registry.version(task, chosen)
        data = info.meta.get("data") or {}
        examples = training.load_examples(
            file,
            text_column=text_column or data.get("text_column") or "text",
            label_column=label_column or data.get("label_column") or "label",
        )
        classifier = registry.get(task, chosen)
        metrics = training.evaluate(classifier, examples)
    except errors.FlowdeskError as exc:
        _error(exc)
    oos = {"label": classifier.out_of_scope_label, "threshold": classifier.threshold}
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "task": task,
                    "version": chosen,
                    "file": str(file),
                    **metrics.as_dict(),
                    "out_of_scope_label": classifier.out_of_scope_label,
                    "threshold": classifier.threshold,
                },
                indent=2,
            )
        )
        return
    typer.echo(f"{task} {chosen} on {file} ({metrics.n} examples)")
    for line in _metrics_lines(metrics.as_dict(), oos):
        typer.echo(line)


@models_cli.command("predict")
def predict_cmd(
    task: Annotated[str, typer.Argument(help="The task name.")],
    texts: Annotated[list[str], typer.Argument(help="Texts to classify ('-': read stdin).")],
    version: Annotated[
        str | None, typer.Option(help="The version (default: the current one).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="How many scores to show.")] = 3,
    models_dir: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Classify TEXTS with a version of TASK."""
    registry = _registry(models_dir)
    if texts == ["-"]:
        texts = [line.strip() for line in sys.stdin if line.strip()]
    try:
        chosen = version or registry.state(task).current
        classifier = registry.get(task, chosen)
        answers = classifier.predict(texts, top_k=top_k)
    except errors.FlowdeskError as exc:
        _error(exc)
    rows = [
        {
            "text": text,
            "label": a.label,
            "confidence": a.confidence,
            "out_of_scope": a.out_of_scope,
            "scores": a.scores,
        }
        for text, a in zip(texts, answers, strict=True)
    ]
    if as_json:
        typer.echo(json.dumps({"task": task, "version": chosen, "answers": rows}, indent=2))
        return
    for row in rows:
        flag = "  (out of scope)" if row["out_of_scope"] else ""
        typer.echo(f"{row['label']}  {row['confidence']:.3f}{flag}  {row['text']}")


def _state_json(state: registry_mod.TaskState) -> dict[str, Any]:
    data = state.as_dict()
    data.pop("history", None)
    return data


@models_cli.command("list")
def list_cmd(models_dir: DirOpt = None, as_json: JsonOpt = False) -> None:
    """List tasks, their versions and metrics, and which version answers."""
    registry = _registry(models_dir)
    try:
        tasks = []
        for task in registry.tasks():
            state = registry.state(task)
            versions = [
                {
                    "version": v.version,
                    "created_at": v.created_at,
                    "features": v.meta.get("features"),
                    "n_examples": v.meta.get("n_examples"),
                    "metrics": v.metrics,
                    "out_of_scope": v.meta.get("out_of_scope"),
                }
                for v in registry.versions(task)
            ]
            tasks.append({**_state_json(state), "versions": versions})
    except errors.FlowdeskError as exc:
        _error(exc)
    if as_json:
        typer.echo(json.dumps({"models_dir": str(registry.path), "tasks": tasks}, indent=2))
        return
    if not tasks:
        typer.echo(f"no models in {registry.path}")
        return
    for entry in tasks:
        extra = ""
        if entry["canary"]:
            extra += f"  canary {entry['canary']['version']} {entry['canary']['percent']:g}%"
        if entry["shadow"]:
            extra += f"  shadow {entry['shadow']['version']}"
        typer.echo(f"{entry['task']}  current {entry['current']}{extra}")
        for v in entry["versions"]:
            m = v["metrics"]
            mark = "*" if v["version"] == entry["current"] else " "
            typer.echo(
                f" {mark} {v['version']:<5} {v['created_at']}  {v['features']:<16} "
                f"n {v['n_examples']}  acc {_fmt(m.get('accuracy'))}  "
                f"macro-F1 {_fmt(m.get('macro_f1'))}  ECE {_fmt(m.get('ece'))}"
            )


def _print_state(state: registry_mod.TaskState, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(_state_json(state), indent=2))
        return
    line = f"{state.task}: current {state.current}"
    if state.canary:
        line += f", canary {state.canary.version} at {state.canary.percent:g}%"
    if state.shadow:
        line += f", shadow {state.shadow}"
    typer.echo(line)


@models_cli.command("promote")
def promote_cmd(
    task: Annotated[str, typer.Argument(help="The task name.")],
    version: Annotated[str, typer.Argument(help="The version to make current (e.g. v2).")],
    models_dir: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make VERSION the current version of TASK."""
    try:
        state = _registry(models_dir).promote(task, version)
    except errors.FlowdeskError as exc:
        _error(exc)
    _print_state(state, as_json)


@models_cli.command("rollback")
def rollback_cmd(
    task: Annotated[str, typer.Argument(help="The task name.")],
    models_dir: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make the previous current version of TASK current again."""
    try:
        state = _registry(models_dir).rollback(task)
    except errors.FlowdeskError as exc:
        _error(exc)
    _print_state(state, as_json)


@models_cli.command("canary")
def canary_cmd(
    task: Annotated[str, typer.Argument(help="The task name.")],
    version: Annotated[str, typer.Argument(help="The version to try, or 'off'.")],
    percent: Annotated[float, typer.Argument(help="Its share of the traffic, 0-100.")] = 0.0,
    models_dir: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send PERCENT of TASK's traffic to VERSION ('off' or 0 ends the canary)."""
    try:
        off = version == "off"
        state = _registry(models_dir).set_canary(task, None if off else version, percent)
    except errors.FlowdeskError as exc:
        _error(exc)
    _print_state(state, as_json)


@models_cli.command("shadow")
def shadow_cmd(
    task: Annotated[str, typer.Argument(help="The task name.")],
    version: Annotated[str, typer.Argument(help="The version to run in the shadow, or 'off'.")],
    models_dir: DirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run VERSION beside TASK's current version ('off' stops it)."""
    try:
        state = _registry(models_dir).set_shadow(task, None if version == "off" else version)
    except errors.FlowdeskError as exc:
        _error(exc)
    _print_state(state, as_json)


def _load_schema(spec: str) -> Any:
    from pydantic import BaseModel

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        _fail(f"--schema {spec!r}: use module:Model")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        _fail(f"--schema {spec!r}: cannot load it: {exc}")
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        _fail(f"--schema {spec!r} is not a Pydantic model class")
    return obj


@models_cli.command("ask")
def ask_cmd(
    task: Annotated[str, typer.Argument(help="The task (in the config; 'generate' by default).")],
    text: Annotated[str, typer.Argument(help="The input text ('-': read stdin).")],
    provider: Annotated[
        str | None,
        typer.Option("--provider", help="Only the task's models on this provider may answer."),
    ] = None,
    schema: Annotated[
        str | None,
        typer.Option("--schema", help="module:Model: the answer must be this Pydantic model."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="FLOWDESK_MODELS_CONFIG",
            help="The gateway's TOML file (default: the packaged local model).",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="At most this many tokens.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask the model gateway TASK about TEXT, and print the answer with its model,
    provider, tokens, latency and cost."""
    import asyncio

    from flowdesk.models import base, rollout
    from flowdesk.models import config as cfg
    from flowdesk.models.gateway import Gateway

    if text == "-":
        text = sys.stdin.read()
    model_cls = _load_schema(schema) if schema else None
    hints: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens else {}

    async def show(chunk: base.Chunk) -> None:
        if chunk.restart:
            typer.echo("\n[the answer starts over]", err=True)
        else:
            typer.echo(chunk.text, nl=False)

    async def main() -> base.Answer:
        gateway_config: cfg.GatewayConfig | None = None
        if config is not None:
            gateway_config, _ = rollout.read_toml(config)
        gateway = Gateway(gateway_config) if gateway_config else Gateway.default()
        try:
            return await gateway.ask(
                task,
                text,
                hints,
                schema=model_cls,
                provider=provider,
                on_chunk=None if as_json else show,
            )
        finally:
            await gateway.close()

    try:
        answer = asyncio.run(main())
    except errors.FlowdeskError as exc:
        if not as_json:
            typer.echo("", err=True)
        _error(exc)
    if as_json:
        typer.echo(json.dumps(answer.model_dump(mode="json"), indent=2, ensure_ascii=False))
        return
    if answer.label is not None:
        typer.echo(f"{answer.label} ({_fmt(answer.confidence, 3)})", nl=False)
    typer.echo("")
    sys.stdout.flush()
    flags = [name for name in ("fallback", "cached", "canary", "escalate") if getattr(answer, name)]
    typer.echo(
        f"model {answer.model} {answer.version} · provider {answer.provider} · tokens "
        f"{answer.tokens_in} in, {answer.tokens_out} out · {answer.latency_ms:.0f} ms · "
        f"{answer.cost_usd:.6f} USD" + (f" · {', '.join(flags)}" if flags else ""),
        err=True,
    )
