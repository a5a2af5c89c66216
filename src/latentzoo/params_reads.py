"""Which params.yaml keys a process reads: the lineage test's evidence that each stage lists them in dvc.yaml.

Off unless ``LATENTZOO_RECORD_PARAMS=<dir>`` is set (read here and nowhere else). Then every field a stage
reads from its validated params is recorded by its dotted key (``params.train.lr`` → ``train.lr``), and the
process writes ``<dir>/<pid>.json`` — its command line and the keys — when it exits. Three rules make a record
mean "this stage's result can depend on that key":

- a section pickled for Ray (a worker's job) counts as read whole: its fields are read in other processes;
- a value that code set (`Params.updated`, e.g. a tune trial's epochs or the tuned weights) is not a read of
  params.yaml, and neither is what validation reads;
- ``model_dump`` (logging, run names) is not a read.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from latentzoo.schema import Section

RECORD_ENV = "LATENTZOO_RECORD_PARAMS"

_reads: set[str] | None = None  # the keys read so far, while recording
_paused = 0  # > 0 while validating
_labels: dict[int, tuple[Section, str, frozenset[str]]] = {}  # id(section) → (section, its key, keys code set)


def recording() -> bool:
    return _reads is not None


def label(params: Section, derived: Iterable[str] = ()) -> None:
    """Name every section of a freshly validated `params` by its dotted key, and note the keys code set."""
    if not recording():
        return
    derived = frozenset(derived)

    def visit(node: Section, key: str) -> None:
        _labels[id(node)] = (node, key, derived)
        for name in type(node).model_fields:
            value = node.__dict__[name]
            child = f"{key}.{name}" if key else name
            if isinstance(value, Section):
                visit(value, child)

    visit(params, "")


@contextmanager
def paused():
    """Reads inside are not recorded (validation reads every key)."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def note(section: Section, name: str) -> None:
    """Record that `section.<name>` was read, if the section came from params.yaml and code did not set it. `name`
    may go deeper than a field (`space.vae`: one model's entry of tune.space). A field holding a section is
    navigation, not a read."""
    entry = _labels.get(id(section))
    if entry is None or _paused or _reads is None or isinstance(section.__dict__.get(name), Section):
        return
    _, key, derived = entry
    dotted = f"{key}.{name}" if key else name
    if dotted not in derived:
        _reads.add(dotted)


def derived_keys(params: Section) -> frozenset[str]:
    """The keys code set in `params` (empty when not recording)."""
    entry = _labels.get(id(params))
    return entry[2] if entry else frozenset()


def _getattribute(self, name):
    value = object.__getattribute__(self, name)
    if name in type(self).model_fields:
        note(self, name)
    return value


def _getstate(self):
    for name in type(self).model_fields:  # shipped to a worker: it may read any of them
        note(self, name)
    return _plain_getstate(self)


_plain_getstate = Section.__getstate__


def _begin() -> set[str]:
    global _reads
    _reads = set()
    Section.__getattribute__ = _getattribute
    Section.__getstate__ = _getstate
    return _reads


def _end() -> None:
    global _reads
    _reads = None
    _labels.clear()
    del Section.__getattribute__  # back to object's and pydantic's own
    Section.__getstate__ = _plain_getstate


@contextmanager
def recorded() -> Iterator[set[str]]:
    """The keys read by params validated inside the block (a test's view; the env var records a whole process)."""
    try:
        yield _begin()
    finally:
        _end()


def _write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"argv": sys.argv, "reads": sorted(_reads or ())}
    (folder / f"{os.getpid()}.json").write_text(json.dumps(record))


if os.environ.get(RECORD_ENV):  # a whole process: from import to exit
    _begin()
    atexit.register(_write, Path(os.environ[RECORD_ENV]))
