"""What a sweep folder already holds, and what ``--resume`` and ``--extend`` may do with it: the
policy (``check``, before Ray starts), the record of what ran (``sweep.json``), the trials
Tune's restored state forgot (``orphans``), and what a resume must still run so that every point
of the recorded grid has its row (``missing``, ``reruns``). No Ray."""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .. import storage
from ..errors import ConfigError
from . import tables
from .spec import TUNE_DIR, SweepSpec, changes

# what --retry-failed (and --retry-stopped) run again: the statuses of their rows
RETRY_FAILED, RETRY_STOPPED = ("error", "diverged"), ("stopped",)
INTERRUPTED = "interrupted"   # a row a resume always continues (the trial was running at Ctrl-C)


def check(spec: SweepSpec, *, resume: bool = False, extend: bool = False, retry: tuple = ()) -> Optional[list]:
    """Refuse, before Ray starts, a run that would not do what sweep.json says: a new sweep over an
    existing one, a --resume with other settings. With ``extend``: the grid points to add. A
    --resume of a sweep file whose grid an --extend grew takes the recorded grid (``spec.grid``)."""
    root, stored_path = spec.root, spec.root / "sweep.json"
    exists = (root / TUNE_DIR).exists()
    if retry and not resume:
        flag = "--retry-failed" if set(retry) & set(RETRY_FAILED) else "--retry-stopped"
        raise ConfigError(f"{flag}: runs trials of an existing sweep again; add --resume")
    if not (resume or extend):
        if exists:
            raise ConfigError(f"name: sweep {spec.name!r} already exists at {str(root)!r}; pass --resume to continue "
                              "it or --name to start another")
        return None
    if not exists and not (resume and stored_path.exists()):   # a resume may have set Tune's state aside
        flag = "--extend" if extend else "--resume"
        raise ConfigError(f"{flag}: no sweep to continue at {str(root / TUNE_DIR)!r}; run it without {flag} first")
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else {}
    diff = changes(stored, spec.record())
    if not extend:
        if diff and _extended_from(stored, spec, diff):   # an --extend, interrupted or not: its grid is the truth
            spec.grid, diff = stored["grid"], []
        if diff:
            raise ConfigError(f"--resume: sweep {spec.name!r} ran with other settings ({'; '.join(diff)}); resume it "
                              "unchanged, start a new sweep with --name NEW, or add grid values with --extend")
        return None
    return _added_points(spec, stored, diff)


def _extended_from(stored: dict, spec: SweepSpec, diff: list[str]) -> bool:
    """Whether ``spec`` differs from the record only by having a grid an --extend grew from."""
    grown_from = [e["grid"] for e in stored.get("extended", [])]
    return all(d.startswith("grid.") for d in diff) and spec.record()["grid"] in grown_from


def _added_points(spec: SweepSpec, stored: dict, diff: list[str]) -> list:
    """--extend: the grid points the spec adds to the finished sweep ``stored``, or why it may not."""
    others = [d for d in diff if not d.startswith("grid.")]
    if others or spec.searcher != "grid" or set(stored.get("grid", {})) != set(spec.grid):
        why = "; ".join(others) or "the grid's keys or the searcher changed"
        raise ConfigError(f"--extend: only adds values to an existing grid key of a grid sweep; {why}; "
                          "start a new sweep with --name NEW")
    old = SweepSpec(name=spec.name, base=spec.base, grid=stored["grid"])
    done = {json.dumps(p, sort_keys=True) for p in old.grid_points()}
    gone = done - {json.dumps(p, sort_keys=True) for p in spec.grid_points()}
    if gone:
        raise ConfigError(f"--extend: only adds grid values; {'; '.join(diff)} drops trials that ran; "
                          "keep every value")
    points = [p for p in spec.grid_points() if json.dumps(p, sort_keys=True) not in done]
    if not points:
        raise ConfigError(f"--extend: the grid adds no trials to sweep {spec.name!r}; add values to a grid key")
    root = spec.root
    rows = len(tables.read(root, "trials", ["trial_id"])) if (root / "tables" / "trials").is_dir() else 0
    if rows < len(done) * spec.num_samples:
        raise ConfigError(f"--extend: sweep {spec.name!r} has unfinished trials ({rows} of "
                          f"{len(done) * spec.num_samples} done); finish them first with --resume")
    return points


def write_record(spec: SweepSpec, *, resume: bool, added: Optional[list]) -> None:
    """Write sweep.json: the settings this run has, and every grid an --extend grew from.
    ``added``: the points --extend adds; the finished Tune experiment is then kept aside (tune.N)
    and a new one runs only those."""
    root = spec.root
    root.mkdir(parents=True, exist_ok=True)
    record = spec.record()
    if added is not None:
        stored = json.loads((root / "sweep.json").read_text())
        record["extended"] = stored.get("extended", []) + [{"grid": stored["grid"], "added": len(added)}]
        set_aside(root)
    elif resume and (root / "sweep.json").exists():
        record["extended"] = json.loads((root / "sweep.json").read_text()).get("extended", [])
    storage.write_text(root / "sweep.json", json.dumps(record, indent=1))


def set_aside(root: Path) -> None:
    """Keep the sweep's Tune experiment as tune.N, so that a new one can run in ``tune``: the
    trials --extend adds, or those a resume runs beside what Tune restored."""
    if (root / TUNE_DIR).exists():
        n = 1 + sum(1 for p in root.glob(f"{TUNE_DIR}.*"))
        (root / TUNE_DIR).rename(root / f"{TUNE_DIR}.{n}")


def forgotten(root) -> dict:
    """``orphans(root)``, or none when they cannot be read (e.g. a Tune whose snapshot reads
    otherwise): resuming still works, and says what it may run twice."""
    try:
        return orphans(root)
    except Exception as e:
        print(f"cts-ray: finding trials Tune's state forgot failed ({type(e).__name__}: {e}); trials that "
              "ended after its last snapshot may run again", file=sys.stderr)
        return {}


def orphans(root) -> dict:
    """Trials of the sweep at ``root`` that the Tune state about to be restored does not know:
    created after its last snapshot (Tune takes one every 10 s or more), they finished, failed or
    saved progress before the driver died. Tune creates their points again under new trial ids;
    such a trial adopts one of these (trainable.adopt) and goes on as it, so no point runs twice
    or gets two rows. Returns {config hash: [{trial_id, status, steps, final numbers}]}."""
    from ..records import REPORTED
    known = set()
    for d in [root / TUNE_DIR, *sorted(root.glob(f"{TUNE_DIR}.*"))]:   # --extend keeps older ones aside
        known |= _readable_trial_ids(d)
    for claim in (root / "adopted").glob("*"):   # claimed by a trial Tune forgot as well: void
        if claim.read_text() not in known:
            claim.unlink()
    skip = known | {c.name for c in (root / "adopted").glob("*")}
    out = defaultdict(list)
    unknown = [r for r in rows(root, "trials") if r["trial_id"] not in skip]
    if unknown:
        steps = defaultdict(int)   # a finished trial's records, so its final report's step is the one it had
        for r in rows(root, "epochs", ["trial_id"]):
            steps[r["trial_id"]] += 1
        for r in unknown:
            out[r["config_hash"]].append({"trial_id": r["trial_id"], "steps": steps[r["trial_id"]],
                                          **{k: r[k] for k in REPORTED}})
    with_rows = {r["trial_id"] for r in unknown}
    for p in sorted((root / "progress").glob("*.json")):   # started, no row yet
        if p.stem not in skip and p.stem not in with_rows:
            out[json.loads(p.read_text())["config_hash"]].append({"trial_id": p.stem, "status": None})
    return dict(out)


def tune_trial_ids(path) -> set:
    """The trial ids in a Tune experiment folder's newest state snapshot, the one Tuner.restore
    loads (read directly: ray.tune.ExperimentAnalysis would also parse every trial's results)."""
    snapshots = sorted(Path(path).glob("experiment_state-*.json"))   # named by time: the last is newest
    if not snapshots:
        return set()
    return {json.loads(trial)["trial_id"] for trial, _ in json.loads(snapshots[-1].read_text())["trial_data"]}


def _readable_trial_ids(path) -> set:
    """``tune_trial_ids``, or none from a damaged snapshot (its trials are then all forgotten)."""
    try:
        return tune_trial_ids(path)
    except (ValueError, KeyError, TypeError, IndexError):   # what a truncated or odd snapshot raises
        return set()


def restorable(path) -> bool:
    """Whether Tune's newest state snapshot in ``path`` reads whole and names a trial: a truncated
    or empty one makes ``Tuner.restore``'s fit fail (it is then set aside and the grid's points
    without a row run afresh)."""
    try:
        return bool(_readable_trial_ids(path))
    except OSError:
        return False


# ---- what a resume must still run: the recorded grid against the rows

def _values(spec: SweepSpec, row: dict) -> dict:
    """A row's swept values (dotted keys), read from its config."""
    from ..config import flatten
    flat = flatten(json.loads(row["config"]))
    return {k: flat[k] for k in {**spec.grid, **spec.sample} if k in flat}


def points_of(spec: SweepSpec, have_rows: list) -> list:
    """The grid point (or sampled values) each row ran: its swept values, or, where they are not
    a point of the recorded grid as written, the point whose config hash it has."""
    if spec.searcher != "grid":
        return [_values(spec, r) for r in have_rows]
    grid = {json.dumps(p, sort_keys=True): p for p in spec.grid_points()}
    out, by_hash = [], None
    for r in have_rows:
        v = _values(spec, r)
        if json.dumps(v, sort_keys=True) not in grid:
            if by_hash is None:
                from ..config import from_dict
                by_hash = {from_dict(spec.trial_raw(p)).hash: p for p in grid.values()}
            v = by_hash.get(r["config_hash"], v)
        out.append(v)
    return out


def missing(spec: SweepSpec, have_rows: list) -> list:
    """The trials the recorded sweep lacks a row for: a grid point once per missing repeat
    (``num_samples``), or None per sampled trial a random or Optuna sweep has yet to run. A row
    counts for its point by its swept values, else (a value its config holds otherwise, e.g. an
    int grid value as a float) by config hash, resolved only for the points still short."""
    if spec.searcher != "grid":
        return [None] * max(0, spec.num_samples - len({r["trial_id"] for r in have_rows}))
    key = lambda p: json.dumps(p, sort_keys=True)
    points, have = spec.grid_points(), defaultdict(int)
    values = [key(_values(spec, r)) for r in have_rows]
    for v in values:
        have[v] += 1
    short = [p for p in points if have[key(p)] < spec.num_samples]
    if short:
        from ..config import from_dict
        by_hash = {from_dict(spec.trial_raw(p)).hash: key(p) for p in short}
        for r, v in zip(have_rows, values):
            if by_hash.get(r["config_hash"], v) != v:
                have[by_hash[r["config_hash"]]] += 1
    out = []
    for p in points:
        n = min(have[key(p)], spec.num_samples)
        have[key(p)] -= n
        out += [p] * (spec.num_samples - n)
    return out


def settle_study(spec: SweepSpec, url: str) -> int:
    """An Optuna sweep after a resume: the study's trials still RUNNING were asked by a driver
    that died. Each is told the result of the row its values made (a trial that finished while
    Tune's state forgot it), or failed (its trial never got a row; the resume sampled another),
    so the study completes each trial once. Returns how many it told."""
    import optuna
    study = optuna.load_study(study_name=spec.name, storage=url)
    metrics = spec.metric if isinstance(spec.metric, list) else [spec.metric]
    by_values = {json.dumps(_values(spec, r), sort_keys=True): r for r in rows(spec.root)}
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        r = by_values.get(json.dumps(t.params, sort_keys=True))
        values = [r[m] for m in metrics] if r is not None and r["status"] == "finished" else None
        if values is None or None in values:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(t.number, values if len(values) > 1 else values[0])
    return len(stale)


def afresh(have_rows: list, retry: tuple) -> list:
    """The ids of the trials ``--retry-failed`` runs afresh (their saved progress dropped): every
    failed one but those a data file failed (DataFileError): their saved epochs are sound, so they
    continue from them once the file is fixed."""
    return [r["trial_id"] for r in have_rows if r["status"] in retry
            and not (r.get("error") or "").startswith("DataFileError")]


def reruns(have_rows: list, statuses: tuple, before: float) -> list:
    """The rows of ``statuses`` not written since ``before`` (the resume's start): trials to run
    again under their own ids (an interrupted one, a failed one to retry), so their rows are replaced."""
    return [r for r in have_rows if r["status"] in statuses and (r["ended_at"] or 0) < before]


def claimable(root: Path, again: list) -> dict:
    """``orphans``' form for the trials a resume runs beside Tune's restored state: ``again``
    (rows) and every trial that saved progress but has no row. Their claims are void (this
    driver alone runs the sweep, and the trials that claimed them have ended)."""
    with_rows = {r["trial_id"] for r in rows(root, "trials", ["trial_id"])}
    out = defaultdict(list)
    for r in again:
        out[r["config_hash"]].append({"trial_id": r["trial_id"], "status": None})
    for p in sorted((root / "progress").glob("*.json")):
        if p.stem not in with_rows:
            out[json.loads(p.read_text())["config_hash"]].append({"trial_id": p.stem, "status": None})
    for os_ in out.values():
        for o in os_:
            (root / "adopted" / o["trial_id"]).unlink(missing_ok=True)
    return dict(out)


def rows(root, table: str = "trials", columns=None) -> list:
    """A table's rows as dicts; none when the sweep has no such table yet."""
    try:
        return tables.read(root, table, columns).to_pylist()
    except FileNotFoundError:
        return []
