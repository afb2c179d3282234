"""The study of ``optimize --study``: where Optuna keeps the trials (an SQLite file, a database
URL, a journal file on shared storage, Redis), read as hostile input and shared by workers.

A study is resumed only if it minimizes two objectives, its record (model, direction file,
prompt sets and search space, kept in the study's user attributes) is this search's, and
its completed trials hold points of this search space. Anything else is a one-line error
before a trial runs: trials of another model or space would be mixed into the choice of
the plan. Several processes (on one machine or many) may open one study at once: the one
whose ``create_study`` wins creates it, stores the record and seeds it; the others load it
and are checked against that record.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AbliterateError, cause

STUDY_NAME = "abliterate-optimize"
RECORD = {"model": "model", "model_sha256": "model header (config and tensor layout)",
          "directions_sha256": "direction file", "prompts_sha256": "prompt sets", "space": "search space"}

Problem = Callable[[Mapping[str, Any]], "str | None"]  # what makes a trial's parameters foreign, or None


@dataclass(frozen=True)
class Storage:
    """Where a study lives, as ``--study`` named it: kind "sqlite" or "journal" (a local or
    shared file at ``path``), "database" or "redis" (``url``)."""

    text: str
    kind: str
    path: Path | None = None
    url: str | None = None

    @property
    def name(self) -> str:
        """How messages name it: as given, a URL's password hidden."""
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", self.text)

    def check(self) -> None:
        """What can be checked before Optuna touches it (a file's kind, its folder, a driver)."""
        if self.kind == "sqlite":
            _check_sqlite(self)
        elif self.kind == "journal":
            _check_journal(self)
        elif self.kind == "redis" and importlib.util.find_spec("redis") is None:
            raise AbliterateError(f"--study {self.name}: a Redis study needs the redis package (pip install redis)")

    def open(self, optuna: Any) -> Any:
        """Optuna's storage object for it."""
        if self.kind == "journal":
            journal = optuna.storages.journal
            return optuna.storages.JournalStorage(journal.JournalFileBackend(str(self.path)))
        if self.kind == "redis":
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalRedisBackend(self.url))
        return optuna.storages.RDBStorage(self.url if self.kind == "database" else f"sqlite:///{self.path}")


def parse_storage(text: str | Path) -> Storage:
    """``--study``'s value: ``journal:PATH`` or a ``.log`` path (a journal file), ``redis://...``,
    a SQLAlchemy database URL (``sqlite:///PATH`` is an SQLite file), or any other path (an
    SQLite file, as before URLs were accepted)."""
    text = str(text)
    if text.startswith("journal:"):
        return _file(text, "journal", text[len("journal:"):])
    if text.startswith(("redis://", "rediss://", "unix://")):
        return Storage(text, "redis", url=text)
    if "://" not in text:
        return _file(text, "journal" if text.endswith(".log") else "sqlite", text)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = Storage(text, "database").name
    try:
        url = make_url(text)
        url.get_dialect()
    except NoSuchModuleError:
        raise AbliterateError(f"--study {shown}: unknown database kind '{text.split('://')[0]}' (give a path, "
                              "journal:PATH, a database URL such as postgresql://... or mysql+pymysql://..., "
                              "or redis://...)") from None
    except (ArgumentError, ValueError) as exc:
        raise AbliterateError(f"--study {shown}: not a database URL ({cause(exc).replace(text, shown)})") from None
    if url.get_backend_name() == "sqlite":
        return _file(text, "sqlite", url.database or "")
    return Storage(text, "database", url=text)


def _file(text: str, kind: str, where: str) -> Storage:
    if not where or where == ":memory:":
        raise AbliterateError(f"--study {text}: names no file")
    return Storage(text, kind, path=Path(where))


def open_study(optuna: Any, where: str | Path | None, sampler: Any, record: Mapping[str, str], problem: Problem,
               on_create: Callable[[Any], None] = lambda study: None, create: bool = True) -> Any:
    """The study to search in: in memory without ``where``, else the named storage's, created
    (``create``) or loaded and checked.

    ``record`` (keys of ``RECORD``) is stored in a new study and compared with a loaded one;
    ``problem`` says what makes a completed trial's parameters foreign to this search;
    ``on_create`` runs once, in the process that created the study (to seed it).
    """
    if where is None:
        study = optuna.create_study(directions=["minimize", "minimize"], study_name=STUDY_NAME, sampler=sampler)
        on_create(study)
        return study
    storage = parse_storage(where)
    storage.check()
    with _reading(storage.name):
        backend = storage.open(optuna)
        study, created = _load_or_create(optuna, backend, sampler, storage, create)
        if created:
            _store(study, record)
            on_create(study)
        else:
            _check_study(optuna, study, storage.name, record, problem)
    return study


def _load_or_create(optuna: Any, backend: Any, sampler: Any, storage: Storage, create: bool) -> tuple[Any, bool]:
    """(study, whether this call created it). Loading first writes nothing to a study that is
    then refused; of workers creating one at once, the storage lets one win."""
    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=backend, sampler=sampler), False
    except KeyError:
        if not create:
            raise AbliterateError(f"--study {storage.name}: holds no study of optimize yet") from None
    try:
        study = optuna.create_study(directions=["minimize", "minimize"], study_name=STUDY_NAME, storage=backend,
                                    sampler=sampler)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=STUDY_NAME, storage=backend, sampler=sampler), False


def _check_sqlite(storage: Storage) -> None:
    """An existing file must be an undamaged SQLite database with Optuna's tables (Optuna would
    otherwise add its tables to any SQLite file); a new one needs an existing folder."""
    path, name = _folder_exists(storage), storage.name
    if not path.exists() or path.stat().st_size == 0:
        return
    with _reading(name), closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        check = db.execute("PRAGMA quick_check").fetchone()
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if check != ("ok",):
        found = " ".join(str(check[0]).split())  # quick_check reports on several lines
        raise AbliterateError(f"--study {name}: the SQLite file is damaged ({_short(found, 200)})")
    if not {"studies", "trials", "version_info"} <= tables:
        raise AbliterateError(f"--study {name}: an SQLite file, but not an Optuna study (no Optuna tables)")


def _check_journal(storage: Storage) -> None:
    """A journal is appended to, and Optuna locks it with ``PATH.lock`` beside it: both must be
    what they seem (no symlink leading the writes elsewhere, no file of the user's where the
    lock goes), and an existing journal must start with a journal entry."""
    path, name = _folder_exists(storage), storage.name
    if path.is_symlink():
        raise AbliterateError(f"--study {name}: the journal is a symbolic link; name the file itself")
    if path.exists() and not path.is_file():
        raise AbliterateError(f"--study {name}: not a regular file")
    lock = path.with_name(path.name + ".lock")
    if lock.exists() and not lock.is_symlink():
        raise AbliterateError(f"--study {name}: {lock} is in the way of the journal's lock (Optuna makes it "
                              "as a symbolic link, and removes a stale one); move it")
    if not path.exists() or path.stat().st_size == 0:
        return
    with _reading(name), open(path, "rb") as f:
        first = f.readline(1 << 16)
    try:
        entry = json.loads(first)
    except ValueError:
        entry = None
    if not isinstance(entry, dict) or "op_code" not in entry:
        raise AbliterateError(f"--study {name}: not an Optuna journal (its first line is no journal entry)")


def _folder_exists(storage: Storage) -> Path:
    assert storage.path is not None
    if not storage.path.parent.is_dir():
        raise AbliterateError(f"--study {storage.name}: folder {storage.path.parent} does not exist")
    return storage.path


def _check_study(optuna: Any, study: Any, name: str, record: Mapping[str, str], problem: Problem) -> None:
    """Refuse a study of another search; then store ``record`` in it, which also proves the
    storage writable before a trial runs."""
    minimize = optuna.study.StudyDirection.MINIMIZE
    if list(study.directions) != [minimize, minimize]:
        raise AbliterateError(f"--study {name}: study '{STUDY_NAME}' has {len(study.directions)} objective(s), not the "
                              "two this search minimizes (refusal score, KL); choose another --study")
    trials = study.trials
    if trials or any(key in study.user_attrs for key in RECORD):
        _check_record(study.user_attrs, name, record)
        _check_trials(optuna, trials, name, problem)
    _store(study, record)


def _store(study: Any, record: Mapping[str, str]) -> None:
    for key, value in record.items():
        study.set_user_attr(key, value)


def _check_record(stored: Mapping[str, Any], name: str, record: Mapping[str, str]) -> None:
    """Each part of ``record`` (in ``RECORD``'s order) equals the stored one."""
    for key, words in RECORD.items():
        if key not in record:
            continue
        if key not in stored:
            raise AbliterateError(f"--study {name}: records no {words} (not made by this version of optimize); "
                                  "choose another --study")
        if stored[key] != record[key]:
            raise AbliterateError(f"--study {name}: made for another {words} ({_short(stored[key])}), not this run's "
                                  f"({_short(record[key])}); choose another --study")


def _check_trials(optuna: Any, trials: list[Any], name: str, problem: Problem) -> None:
    """Every completed trial (those the plan is chosen from) has two numbers as values and this
    space's parameters (SQLite stores whatever a cell was given: a value may read back as text)."""
    for t in trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        values = t.values or []
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise AbliterateError(f"--study {name}: trial {t.number} has objective values {_short(values)}, not two "
                                  "numbers")
        if (why := problem(t.params)) is not None:
            raise AbliterateError(f"--study {name}: trial {t.number} {why}")


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """Whatever opening the study raises (SQLite, SQLAlchemy, a database driver, Optuna parsing
    what it stored), as one line: the study is input, and a damaged or unreachable one can
    fail anywhere in them."""
    try:
        yield
    except AbliterateError:
        raise
    except Exception as exc:
        raise AbliterateError(f"--study {name}: cannot be used as a study ({cause(exc)})") from None


def _short(text: object, limit: int = 120) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
