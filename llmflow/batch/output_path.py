"""Placeholders in a batch's output path, so one deployment writes a new file every run.

The output file is the resume checkpoint: with a fixed name, every night after the first
finds all its requests done and sends nothing. ``out/nightly-{date}.jsonl`` gives each night
its own file, named by the run's *scheduled* start, so a run that starts late, or is run
again the same night, still writes (and resumes) that night's file. Pure: no clock, no Prefect.
"""

from __future__ import annotations

import difflib
import string
from datetime import datetime
from pathlib import Path

PLACEHOLDERS: dict[str, str] = {
    "date": "the run's scheduled start, YYYY-MM-DD",
    "time": "the run's scheduled start, HHMMSS",
    "flow_run_name": "the Prefect flow run's name",
    "flow_run_id": "the Prefect flow run's id",
}
FIELD = "batch.output_path"


def _fields(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    """``string.Formatter``'s pieces of ``template``; a stray brace is a ValueError naming the field."""
    try:
        return list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{FIELD}: {exc} in {template!r} (write {{{{ and }}}} for a literal brace)") from None


def placeholders(template: str) -> list[str]:
    """The placeholder names ``template`` uses, in order; a ValueError for any that is not known."""
    known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
    names = []
    for _, name, spec, conversion in _fields(template):
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            close = difflib.get_close_matches(name.lower(), list(PLACEHOLDERS), n=1, cutoff=0.6)
            hint = f"; did you mean {{{close[0]}}}?" if close else ""
            raise ValueError(f"{FIELD}: unknown placeholder {{{name}}} in {template!r}; known: {known}{hint}")
        if spec or conversion:
            raise ValueError(f"{FIELD}: {{{name}}} takes no format spec or conversion in {template!r}")
        names.append(name)
    return names


def _path_safe(text: str) -> str:
    """A flow run name is free text: a slash in it must not make a folder."""
    return text.replace("/", "-").replace("\\", "-").replace("\0", "")


def render(template: Path, when: datetime, run_name: str | None, run_id: str | None) -> Path:
    """``template`` with its placeholders filled in: ``{date}``/``{time}`` from ``when`` (already
    in the timezone the names should use), the rest from the flow run.

    A ValueError when a placeholder is unknown or names a flow run there is none of.
    """
    text = str(template)
    values = {
        "date": when.strftime("%Y-%m-%d"),
        "time": when.strftime("%H%M%S"),
        "flow_run_name": _path_safe(run_name) if run_name else None,
        "flow_run_id": run_id,
    }
    placeholders(text)  # unknown names and format specs, with the same message as validation
    parts = []
    for literal, name, _, _ in _fields(text):
        parts.append(literal)
        if name is None:
            continue
        if values[name] is None:
            raise ValueError(f"{FIELD}: {{{name}}} needs a flow run, and {template} is rendered outside one")
        parts.append(values[name])
    return Path("".join(parts))
