"""Dialogs: confirm, a number, the deploy form (with its resource evaluation), a new key
(shown once), another node to attach to, and help. Each fits in 80×24 and closes on esc."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.validation import Integer
from textual.widgets import Button, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option

from .client import ApiError
from .format import needs, size

if TYPE_CHECKING:
    from .app import GpumeshConsole

__all__ = ["ConfirmModal", "DeployModal", "HelpModal", "NewKeyModal", "SecretModal",
           "NodePickerModal", "NumberModal"]


class _Dialog(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="dialog.cancel")]
    app: GpumeshConsole


class ConfirmModal(_Dialog):
    """Yes/no; `y` and `n` work too. Destructive questions get the error-coloured button."""

    BINDINGS = [Binding("y", "answer(True)", "Yes", id="confirm.yes"),
                Binding("n", "answer(False)", "No", id="confirm.no"),
                Binding("escape", "answer(False)", "No", show=False, id="confirm.cancel")]

    def __init__(self, question: str, yes: str = "Yes", destructive: bool = False) -> None:
        super().__init__()
        self.question = question
        self.yes = yes
        self.destructive = destructive

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(escape(self.question), classes="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", id="yes", compact=True,
                             variant="error" if self.destructive else "primary")
                yield Button("No (n)", id="no", compact=True)

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class NumberModal(_Dialog):
    """A whole number within bounds (a replica count)."""

    def __init__(self, question: str, value: int, minimum: int, maximum: int) -> None:
        super().__init__()
        self.question = question
        self.value = value
        self.bounds = (minimum, maximum)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(escape(self.question), classes="question")
            yield Input(str(self.value), type="integer", compact=True, id="number",
                        validators=[Integer(*self.bounds)])
            yield Label("", classes="error", id="error")
            yield Label(f"enter: apply · esc: cancel ({self.bounds[0]}–{self.bounds[1]})",
                        classes="hint")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.validation_result and not event.validation_result.is_valid:
            self.query_one("#error", Label).update(
                "; ".join(event.validation_result.failure_descriptions))
            return
        self.dismiss(int(event.value))


class DeployModal(_Dialog):
    """Source, name, replicas, backend, context; Enter evaluates (where the scheduler would
    place it and what it needs), Enter again deploys. Returns the spec, or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="deploy.cancel"),
                Binding("ctrl+s", "submit", "Evaluate / deploy", id="deploy.submit")]
    AUTO_FOCUS = "#source"

    def __init__(self, backends: list[str]) -> None:
        super().__init__()
        self.backends = backends
        self.evaluated: dict[str, Any] | None = None    # the spec the evaluation was for

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="deploy"):
            yield Label("[b]Deploy a model[/b]")
            yield Input(placeholder="source: /path/model.gguf or owner/repo[:file.gguf]",
                        id="source", compact=True)
            yield Input(placeholder="name (default: from the source)", id="name", compact=True)
            with Horizontal(classes="row"):
                yield Label("replicas ")
                yield Input("1", id="replicas", type="integer", compact=True,
                            validators=[Integer(0, 64)])
                yield Label(" context ")
                yield Input(placeholder="auto", id="context", type="integer", compact=True,
                            validators=[Integer(1)], valid_empty=True)
            yield Select([(b, b) for b in self.backends], prompt="backend: auto",
                         id="backend", compact=True, allow_blank=True)
            yield Static("", id="evaluation")
            yield Label("", classes="error", id="error")
            with Horizontal(classes="buttons"):
                yield Button("Evaluate (ctrl+s)", id="go", compact=True, variant="primary")
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def spec(self) -> dict[str, Any] | str:
        """The deploy request the form describes, or what is wrong with it."""
        source = self.query_one("#source", Input).value.strip()
        if not source:
            return "a source is needed: a local file or a Hugging Face repository"
        path = Path(source).expanduser()
        if path.exists():                        # the daemon's working dir is not ours
            source = str(path.resolve())
        name = self.query_one("#name", Input).value.strip() or _default_name(source)
        for field in ("replicas", "context"):
            box = self.query_one(f"#{field}", Input)
            result = box.validate(box.value)
            if result is not None and not result.is_valid:
                return f"{field}: {'; '.join(result.failure_descriptions)}"
        spec: dict[str, Any] = {"name": name, "source": source,
                                "replicas": int(self.query_one("#replicas", Input).value or 1)}
        if context := self.query_one("#context", Input).value:
            spec["context_length"] = int(context)
        backend = self.query_one("#backend", Select).value
        if isinstance(backend, str):
            spec["backend"] = backend
        return spec

    def action_submit(self) -> None:
        spec = self.spec()
        error = self.query_one("#error", Label)
        if isinstance(spec, str):
            error.update(escape(spec))
            return
        error.update("")
        if spec == self.evaluated:
            self.dismiss(spec)
        else:
            self._evaluate(spec)

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()

    @on(Input.Changed)
    def _edited(self, event: Input.Changed) -> None:
        self._forget_evaluation()

    @on(Select.Changed)
    def _backend_changed(self, event: Select.Changed) -> None:
        self._forget_evaluation()

    def _forget_evaluation(self) -> None:
        if self.evaluated is not None:
            self.evaluated = None
            self.query_one("#go", Button).label = "Evaluate (ctrl+s)"

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        else:
            self.action_submit()

    @work(exclusive=True, group="evaluate", exit_on_error=False)
    async def _evaluate(self, spec: dict[str, Any]) -> None:
        panel = self.query_one("#evaluation", Static)
        panel.update("evaluating…")
        try:
            result = await self.app.client.post("/api/models/evaluate", spec)
            text = describe_evaluation(result)
        except ApiError as exc:
            if not exc.missing_route:
                panel.update(f"[b]cannot deploy:[/b] {escape(str(exc))}")
                return
            text = ("this node has no evaluation API yet (POST /api/models/evaluate): the "
                    "memory estimate and placement show after deploying")
        panel.update(text)
        self.evaluated = spec
        self.query_one("#go", Button).label = "Deploy (ctrl+s)"


def describe_evaluation(result: Any) -> str:
    """The scheduler's answer (`POST /api/models/evaluate`) in a few lines: the estimate,
    where each replica would go (or why not), failed checks, and its summary in words."""
    if not isinstance(result, dict):
        return escape(str(result))
    lines = []
    estimate = result.get("estimate") or {}
    if wanted := needs(estimate):
        lines.append(f"{wanted} per replica (weights {size(estimate.get('weights_bytes'))}, "
                     f"KV cache {size(estimate.get('kv_cache_bytes'))})")
    for n, replica in enumerate((result.get("replicas") or [])[:4], start=1):
        where = f"→ {replica.get('node')}" if replica.get("fits") else "does not fit"
        lines.append(f"replica {n} {where}: {escape(str(replica.get('reason', '')))}")
    lines += [f"✗ {escape(str(c.get('detail')))}" for c in result.get("checks") or []
              if not c.get("ok")]
    fits = result.get("fits")
    verdict = ("[b]fits[/b] · ctrl+s again deploys" if fits else
               "[b]does not fit now[/b] · ctrl+s deploys anyway (it waits for room)")
    lines.append(verdict if fits is not None else escape(str(result.get("summary", ""))))
    return "\n".join(lines)


def _default_name(source: str) -> str:
    """What `gpumesh deploy` would call it: the file's stem, or the repository's name."""
    if os.path.exists(source):
        return Path(source).stem
    repo, _, file = source.partition(":")
    return Path(file).stem if file else repo.rsplit("/", 1)[-1]


class NewKeyModal(_Dialog):
    """Name, owner and expiry of a new API key (a key takes its user's role). Returns the
    request body, or None."""

    AUTO_FOCUS = "#key-name"
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="key.cancel"),
                Binding("ctrl+s", "create", "Create", id="key.create")]

    def __init__(self, users: list[tuple[str, str]]) -> None:
        super().__init__()
        self.users = users                     # (user id, role)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("[b]New API key[/b]")
            yield Input(placeholder="name", id="key-name", compact=True)
            if self.users:
                yield Select([(f"{u} ({role})", u) for u, role in self.users],
                             value=self.users[0][0], id="user", compact=True,
                             allow_blank=False)
            else:
                yield Select([("user", "user"), ("admin", "admin")], value="user",
                             id="role", compact=True, allow_blank=False)
            yield Input(placeholder="expires in days (empty: never)", id="days",
                        type="integer", compact=True, validators=[Integer(1, 3650)],
                        valid_empty=True)
            yield Label("", classes="error", id="error")
            with Horizontal(classes="buttons"):
                yield Button("Create (ctrl+s)", id="create", compact=True, variant="primary")
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def action_create(self) -> None:
        name = self.query_one("#key-name", Input).value.strip()
        days_box = self.query_one("#days", Input)
        result = days_box.validate(days_box.value)
        if not name:
            self.query_one("#error", Label).update("a name is needed")
            return
        if result is not None and not result.is_valid:
            self.query_one("#error", Label).update("expiry: a number of days (1–3650)")
            return
        body: dict[str, Any] = {"name": name}
        for field in ("user", "role"):
            if found := self.query(f"#{field}"):
                body[field] = found.first(Select).value
        if days_box.value:
            body["expires_in_days"] = int(days_box.value)
        self.dismiss(body)

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_create()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        else:
            self.action_create()


class SecretModal(_Dialog):
    """A secret shown once (a new API key, a join token): selectable text, and a button
    that copies it (OSC 52)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close", id="shown.close"),
                Binding("c", "copy", "Copy", id="shown.copy")]

    def __init__(self, key: str, title: str) -> None:
        super().__init__()
        self.key = key
        self.title_ = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(f"[b]{escape(self.title_)}[/b]: shown only now; store it")
            yield Input(self.key, id="the-key", compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Copy (c)", id="copy", compact=True, variant="primary")
                yield Button("Done (esc)", id="done", compact=True)

    def on_mount(self) -> None:
        self.query_one("#copy", Button).focus()

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.key)
        self.notify("copied to the clipboard (terminals without OSC 52: select the text)")

    @on(Input.Changed)
    def _keep(self, event: Input.Changed) -> None:
        if event.value != self.key:            # selectable, not editable
            event.input.value = self.key

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "copy":
            self.action_copy()
        else:
            self.dismiss(None)


class NodePickerModal(_Dialog):
    """The nodes the console knows: attach to another one. Returns its URL, or None."""

    def __init__(self, nodes: list[tuple[str, str, str]], current: str, why: str = "") -> None:
        super().__init__()
        self.nodes = nodes                     # (name, url, state)
        self.current = current
        self.why = why

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("[b]Attach to a node[/b]" + (f" · {escape(self.why)}" if self.why
                                                      else ""))
            yield OptionList(*[Option(f"{'* ' if url == self.current else '  '}"
                                      f"{escape(name)}  {escape(url)}  ({state})", id=url)
                               for name, url, state in self.nodes], id="nodes")
            yield Label("enter: attach · esc: stay", classes="hint")

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class HelpModal(_Dialog):
    """Every binding: the global ones, then each view's, then dialogs' habits."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss(None)", "Close", id="help.close")]

    def __init__(self, sections: list[tuple[str, list[tuple[str, str]]]], about: str) -> None:
        super().__init__()
        self.sections = sections
        self.about = about

    def compose(self) -> ComposeResult:
        lines = [f"[b]gpumesh tui[/b] · {escape(self.about)}" if self.about else
                 "[b]gpumesh tui[/b]"]
        for title, keys in self.sections:
            lines.append(f"\n[b]{escape(title)}[/b]")
            lines += [f"  {escape(key):<14} {escape(what)}" for key, what in keys]
        lines.append("\nThe mouse works too: click a view's name, a row, a column to sort.")
        with VerticalScroll(classes="dialog wide help"):
            yield Static("\n".join(lines))

