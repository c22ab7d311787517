"""The params dvc.yaml tracks, and a params file that leaves some out.

shrinkflow's params have defaults (``shrinkflow.config``): a params file may
leave a key out and the stages read its default. DVC does not know them: it
refuses to run a stage when a key that stage lists under ``params:`` in
dvc.yaml is missing from params.yaml ("Parameters 'data.x' are missing from
'params.yaml'"), after the stages before it have run. A params file written
for an older shrinkflow, which has no key for a param added since, or one
written by hand with only the keys its author changed, would stop there.

``missing_tracked`` finds those keys before anything runs;
``fill_missing`` writes them into a params file's text with their values
(the defaults the stages would read), so that DVC sees every key and the
validated params stay exactly what they were; ``missing_message`` says what
to add where shrinkflow does not write the file itself.
"""

from __future__ import annotations

import io
from pathlib import Path

from shrinkflow.config import Params, ParamsError, parse_params, parse_params_yaml
from shrinkflow.paths import PARAMS

PARAMS_FILE = str(PARAMS)   # the file dvc.yaml's params: name by default

FILLED_COMMENT = "default, written by shrinkflow: dvc.yaml tracks it"


def tracked_params(dvc_yaml: Path | str) -> dict[str, tuple[str, ...]]:
    """Every params.yaml key dvc.yaml's stages list under ``params:``, as
    a dotted path (``data.feedback_heldout_fraction``), with the stages that
    list it, in dvc.yaml's order.

    An entry of ``params:`` is a key of params.yaml, or a mapping of a params
    file to its keys (``- params.yaml: [a.b]``; other files are left out, and
    an empty list, which tracks the whole file, adds nothing). Raises
    OSError when dvc.yaml cannot be read and ValueError when it is not a
    mapping of stages.
    """
    from ruamel.yaml import YAML

    doc = YAML(typ="safe").load(Path(dvc_yaml).read_text(encoding="utf-8")) or {}
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict):
        raise ValueError(f"{dvc_yaml}: no 'stages' mapping")
    found: dict[str, list[str]] = {}
    for name, stage in stages.items():
        entries = stage.get("params") or [] if isinstance(stage, dict) else []
        for entry in entries:
            keys: list = []
            if isinstance(entry, str):
                keys = [entry]
            elif isinstance(entry, dict):
                keys = [k for file, ks in entry.items() if file == PARAMS_FILE for k in (ks or [])]
            for key in keys:
                found.setdefault(str(key), [])
                if name not in found[str(key)]:
                    found[str(key)].append(str(name))
    return {k: tuple(v) for k, v in found.items()}


def _lookup(doc: object, key: str) -> tuple[bool, object]:
    """(found, value) of a dotted key in a parsed YAML document."""
    node = doc
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def missing_tracked(raw: object, tracked: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The keys of ``tracked`` (``tracked_params``) absent from the parsed
    params document ``raw``, each with the stages that track it."""
    return {k: stages for k, stages in tracked.items() if not _lookup(raw, k)[0]}


def _values(params: Params, keys) -> dict[str, object]:
    """Each key's value in the validated params, as YAML writes it. Raises
    ValueError for a key the params do not have (dvc.yaml tracks a key
    shrinkflow does not know)."""
    dumped = params.model_dump(mode="json", by_alias=True)   # validate_ is params.yaml's validate
    out = {}
    for key in keys:
        ok, value = _lookup(dumped, key)
        if not ok:
            raise ValueError(f"dvc.yaml tracks {key}, which shrinkflow's params do not have")
        out[key] = value
    return out


def missing_message(missing: dict[str, tuple[str, ...]], params: Params) -> str:
    """What to add to params.yaml for each missing key: its stages and the
    value the stages read today (its default), as YAML lines."""
    values = _values(params, missing)
    lines = []
    for key, stages in missing.items():
        *parents, leaf = key.split(".")
        where = f" under {'.'.join(parents)}:" if parents else ""
        text = _dump({leaf: values[key]}).rstrip("\n").replace("\n", "\n      ")
        lines.append(f"{key} (tracked by stage{'s' if len(stages) > 1 else ''} {', '.join(stages)}): "
                     f"add{where}\n      {text}")
    return "\n  ".join(lines)


def _yaml():
    """A round-trip ``ruamel.yaml`` that writes ``null`` as ``null`` and
    lists indented as shrinkflow's params files are."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _dump(doc: object) -> str:
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    return buf.getvalue()


def _nested(parts: list[str], value: object) -> object:
    for part in reversed(parts):
        value = {part: value}
    return value


def _is_note(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _end_line(doc, path: list[str], lines: list[str]) -> int:
    """The index of the line before which a key is added at the end of the
    block mapping at ``path`` (``[]``: the document): before its next
    sibling's key, or its ancestors', or the end of the file, and before the
    comments and blank lines that lead into what follows."""
    at = len(lines)
    for i in range(len(path), 0, -1):
        parent = doc
        for part in path[:i - 1]:
            parent = parent[part]
        keys = [k for k in parent.keys() if parent.lc.key(k) is not None]   # not keys a merge (<<) brought
        if path[i - 1] not in keys:
            raise LookupError(path[i - 1])
        j = keys.index(path[i - 1])
        if j + 1 < len(keys):
            at = parent.lc.key(keys[j + 1])[0]
            break
    while at > 0 and _is_note(lines[at - 1]):
        at -= 1
    return at


def _insert_text(text: str, values: dict[str, object]) -> str | None:
    """``text`` with each key of ``values`` added as lines at the end of
    its section (the block mapping of its nearest present parent), leaving
    every other line as it was; None where that cannot be done by adding
    lines (a flow mapping ``{...}``, a parent that is null or a scalar)."""
    from ruamel.yaml.comments import CommentedMap

    doc = _yaml().load(text)
    if doc is None:
        doc = CommentedMap()
    if not isinstance(doc, CommentedMap) or (doc and doc.fa.flow_style()):
        return None
    eol = "\r\n" if "\r\n" in text else "\n"   # the file's own line ending for the added lines
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += eol
    added: dict[int, list[str]] = {}
    for key, value in values.items():
        parts = key.split(".")
        node, path = doc, []
        for part in parts[:-1]:
            if part not in node:
                break
            child = node[part]
            if not isinstance(child, CommentedMap) or not child or child.fa.flow_style():
                return None
            node, path = child, path + [part]
        own = [k for k in node if node.lc.key(k) is not None]   # not keys a merge (<<) brought
        if node is not doc and not own:
            return None
        indent = node.lc.key(own[0])[1] if node is not doc else 0
        pad = " " * indent
        block = [pad + "# " + FILLED_COMMENT + eol] + [
            pad + line + eol for line in _dump(_nested(parts[len(path):], value)).splitlines()]
        added.setdefault(_end_line(doc, path, lines), []).extend(block)
    for at in sorted(added, reverse=True):
        lines[at:at] = added[at]
    return "".join(lines)


def _document_end(text: str) -> str:
    """The document-end marker ``...`` that closes ``text`` (LF lines) and
    the comment and blank lines after it, as written, ending in a newline;
    "" when the text does not end with one. The round trip's dump writes
    neither (a helper's finding: a file ending in ``...`` and a comment lost
    both)."""
    lines = text.splitlines(keepends=True)
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line == "..." or (line.startswith("...") and line[3:4].isspace() and line[3:].lstrip().startswith("#")):
            tail = "".join(lines[i:])
            return tail if tail.endswith("\n") else tail + "\n"
        if line and not line.startswith("#"):
            return ""
    return ""


def _document_start(text: str) -> str:
    """The lines of ``text`` (LF lines) up to and including its
    directives-end marker ``---`` (with the comments, blank lines and ``%``
    directives before it, as written), when that marker comes before any
    content and the marker line holds nothing but a comment; "" otherwise,
    and when a ``%TAG`` directive is there (the body's tags need it).
    ``ruamel.yaml``'s round trip drops them, and garbles a comment on the
    ``---`` line (a helper's finding)."""
    lines = text.splitlines(keepends=True)
    for i, raw in enumerate(lines):
        line = raw.strip().lstrip("\ufeff")   # a byte-order mark before the first line
        if line.startswith("%TAG"):
            return ""   # the body's tags need it: the round trip reads the whole document, as before
        if line == "---" or (line.startswith("---") and line[3:4].isspace()
                             and line[3:].lstrip().startswith("#")):
            return "".join(lines[:i + 1]) if lines[i].endswith("\n") else "".join(lines[:i + 1]) + "\n"
        if line and not line.startswith("#") and not line.startswith("%"):
            return ""   # content first (on the marker's line too, `--- {...}`): nothing to keep apart
    return ""


def fill_missing(text: str, path: Path | str = PARAMS_FILE,
                 tracked: dict[str, tuple[str, ...]] | None = None) -> tuple[str, dict[str, object]]:
    """``text`` (a params file) with every key of ``tracked`` it lacks
    written in, at the end of its section, with the value the stages read
    without it (its default) and a comment line saying so; and those keys
    with their values. Every other line is kept as it was; where a key's
    section cannot take added lines (a flow mapping ``{...}``, a section
    that is null, keys a merge ``<<`` brought), the file is rewritten by
    ``ruamel.yaml``'s round trip instead: comments, values, the line ending
    and a final ``...`` are kept, each added key has its comment line above
    it, a leading ``---`` (with the directives and comments before it) and
    a final ``...`` (with the comments after it) are kept as written, but
    the layout may change (a flow mapping written as a block).

    Unchanged, with ``{}``, when nothing is missing. Raises ParamsError when
    the text is not valid params (``shrinkflow.config``), and ValueError if
    the filled text would read as other params than ``text`` (never returned
    then) or a tracked key is not one of shrinkflow's.
    """
    from ruamel.yaml.comments import CommentedMap

    raw = parse_params_yaml(text, path)
    params = parse_params(raw, path)
    missing = missing_tracked(raw, tracked or {})
    if not missing:
        return text, {}
    values = _values(params, missing)

    def same(filled: str | None) -> bool:
        if filled is None:
            return False
        try:
            raw = parse_params_yaml(filled, path)
            return parse_params(raw, path) == params and not missing_tracked(raw, tracked or {})
        except ParamsError:
            return False

    try:
        filled = _insert_text(text, values)
    except (LookupError, TypeError, AttributeError):   # a layout the line insertion does not know
        filled = None
    if same(filled):
        return filled, values
    # The round trip reads LF (a CRLF file's end-of-line comments would keep
    # their \r) and writes the file's own line ending and document end back.
    crlf = "\r\n" in text
    lf_text = text.replace("\r\n", "\n")
    start = _document_start(lf_text)
    doc = _yaml().load(lf_text[len(start):])
    if doc is None:
        doc = CommentedMap()
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = CommentedMap()
            node = node[part]
        node[leaf] = value
        if isinstance(node, CommentedMap):
            node.fa.set_block_style()
            node.yaml_set_comment_before_after_key(leaf, before=FILLED_COMMENT, indent=2 * len(parents))
    filled = start + _dump(doc) + _document_end(lf_text)
    if crlf:
        filled = filled.replace("\n", "\r\n")
    if not same(filled):
        raise ValueError(f"{path}: writing the missing keys ({', '.join(missing)}) would change the params")
    return filled, values


def check_tracked(project_dir: Path | str, data: bytes, params: Params) -> None:
    """Raise ParamsError when params.yaml (its bytes ``data``, validated as
    ``params``) lacks a key the project's dvc.yaml tracks, naming each with
    its stages and the lines to add; DVC would refuse that stage only when
    it came to it. Nothing is checked when the project has no dvc.yaml."""
    dvc_yaml = Path(project_dir) / "dvc.yaml"
    if not dvc_yaml.is_file():
        return
    path = Path(project_dir) / PARAMS_FILE
    missing = missing_tracked(parse_params_yaml(data, path), tracked_params(dvc_yaml))
    if missing:
        raise ParamsError(path, [("<root>", "DVC refuses to run a stage whose tracked params are missing from "
                                            "params.yaml, so nothing ran: the stages read these defaults, "
                                            "which the file has to name:\n  " + missing_message(missing, params))])


def load_project_params(project_dir: Path | str) -> Params:
    """Read and validate the project's params.yaml once, and check it names
    every key dvc.yaml tracks (``check_tracked``): the entry point of a flow
    that runs DVC stages. Raises ParamsError."""
    from shrinkflow.config import parse_params_bytes

    path = Path(project_dir) / PARAMS_FILE
    if not path.is_file():
        raise ParamsError(path, [("<file>", "file not found")])
    data = path.read_bytes()
    params = parse_params_bytes(data, path)
    check_tracked(project_dir, data, params)
    return params
