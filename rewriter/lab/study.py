"""The study file of ``optimize --study``: an SQLite file in which Optuna keeps the trials, read
as hostile input.

A study is resumed only if it is an Optuna database whose study minimizes two objectives,
whose record (model, direction file and search space, kept in the study's user attributes)
is this search's, and whose completed trials hold points of this search space. Anything else
is a one-line error before a trial runs: trials of another model or space would be mixed
into the choice of the plan.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from ..errors import AbliterateError, cause

STUDY_NAME = "abliterate-optimize"
RECORD = {"model": "model", "directions_sha256": "direction file", "space": "search space"}  # attribute -> words

Problem = Callable[[Mapping[str, Any]], "str | None"]  # what makes a trial's parameters foreign, or None


def open_study(optuna: Any, path: Path | None, sampler: Any, record: Mapping[str, str], problem: Problem) -> Any:
    """The study to search in: in memory without ``path``, else the file's, created or checked.

    ``record`` (keys of ``RECORD``) is stored in a new study and compared with a resumed one;
    ``problem`` says what makes a completed trial's parameters foreign to this search.
    """
    if path is None:
        return optuna.create_study(directions=["minimize", "minimize"], study_name=STUDY_NAME, sampler=sampler)
    _check_file(path)
    with _reading(path):
        study = optuna.create_study(directions=["minimize", "minimize"], study_name=STUDY_NAME,
                                    storage=f"sqlite:///{path}", load_if_exists=True, sampler=sampler)
        _check_study(optuna, study, path, record, problem)
    return study


def _check_file(path: Path) -> None:
    """An existing file must be an undamaged SQLite database with Optuna's tables (Optuna would
    otherwise add its tables to any SQLite file); a new one needs an existing folder."""
    if not path.parent.is_dir():
        raise AbliterateError(f"--study {path}: folder {path.parent} does not exist")
    if not path.exists() or path.stat().st_size == 0:
        return
    with _reading(path), closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        check = db.execute("PRAGMA quick_check").fetchone()
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if check != ("ok",):
        found = " ".join(str(check[0]).split())  # quick_check reports on several lines
        raise AbliterateError(f"--study {path}: the SQLite file is damaged ({_short(found, 200)})")
    if not {"studies", "trials", "version_info"} <= tables:
        raise AbliterateError(f"--study {path}: an SQLite file, but not an Optuna study (no Optuna tables)")


def _check_study(optuna: Any, study: Any, path: Path, record: Mapping[str, str], problem: Problem) -> None:
    """Refuse a study of another search; then store ``record`` in it, which also proves the
    file writable before a trial runs."""
    minimize = optuna.study.StudyDirection.MINIMIZE
    if list(study.directions) != [minimize, minimize]:
        raise AbliterateError(f"--study {path}: study '{STUDY_NAME}' has {len(study.directions)} objective(s), not the "
                              "two this search minimizes (refusal score, KL); choose another --study file")
    trials = study.trials
    if trials or any(key in study.user_attrs for key in RECORD):
        _check_record(study.user_attrs, path, record)
        _check_trials(optuna, trials, path, problem)
    for key, value in record.items():
        study.set_user_attr(key, value)


def _check_record(stored: Mapping[str, Any], path: Path, record: Mapping[str, str]) -> None:
    for key, words in RECORD.items():
        if key not in stored:
            raise AbliterateError(f"--study {path}: records no {words} (not made by this version of optimize); "
                                  "choose another --study file")
        if stored[key] != record[key]:
            raise AbliterateError(f"--study {path}: made for another {words} ({_short(stored[key])}), not this run's "
                                  f"({_short(record[key])}); choose another --study file")


def _check_trials(optuna: Any, trials: list[Any], path: Path, problem: Problem) -> None:
    """Every completed trial (those the plan is chosen from) has two numbers as values and this
    space's parameters (SQLite stores whatever a cell was given: a value may read back as text)."""
    for t in trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        values = t.values or []
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise AbliterateError(f"--study {path}: trial {t.number} has objective values {_short(values)}, not two "
                                  "numbers")
        if (why := problem(t.params)) is not None:
            raise AbliterateError(f"--study {path}: trial {t.number} {why}")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Whatever reading the study file raises (SQLite, SQLAlchemy, Optuna parsing what it
    stored), as one line: the file is input, and a damaged one can fail anywhere in them."""
    try:
        yield
    except AbliterateError:
        raise
    except Exception as exc:
        raise AbliterateError(f"--study {path}: cannot be used as a study ({cause(exc)})") from None


def _short(text: object, limit: int = 120) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
