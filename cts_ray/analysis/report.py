"""`cts-ray report`: one Markdown file with every table and plot, and where the numbers came from."""
from __future__ import annotations

import datetime
import json
import platform
from collections import Counter
from pathlib import Path

from . import comparison, inference, insensitivity, interaction, seeds, strong
from .. import storage
from ..errors import AnalysisError
from .load import Results, load
from ..wording import count

KINDS = {"comparison": comparison, "seeds": seeds, "insensitivity": insensitivity, "interaction": interaction}
TITLES = {"comparison": "Method comparison", "seeds": "Seed variance", "insensitivity": "Hyperparameter insensitivity",
          "interaction": "Interaction of swept hyperparameters"}


def run_kind(kind: str, res: Results, out: Path | None = None, **options) -> tuple[str, list[str]]:
    """One analysis: its Markdown and (when ``out`` is given) the PNG files it wrote."""
    mod = KINDS[kind]
    result = mod.analyse(res, **options)
    files = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        files = mod.plot(res, result, out)
    return mod.markdown(result), files


def _when(ts) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def provenance(res: Results) -> str:
    t = res.trials
    libs = Counter()
    for text in t["library_versions"].dropna():
        libs.update(f"{k} {v}" for k, v in json.loads(text).items())
    sweeps = []
    for folder, meta in res.sweeps:
        n = int((t["sweep"] == meta.get("name", Path(folder).name)).sum())
        grid = ", ".join(f"{k} × {len(v)}" for k, v in (meta.get("grid") or {}).items())
        sweeps.append(f"| {Path(folder).name} | {meta.get('source') or '–'} | {meta.get('searcher', '–')} "
                      f"| {grid or '–'} | {n} | `{folder}` |")
    versions = Counter(t["code_version"].fillna("unknown"))
    out = ["| sweep | file | searcher | grid | trials used | folder |", "|---|---|---|---|---:|---|", *sweeps, "",
           f"- trials: {res.describe()}",
           f"- configs: {t['config_hash'].nunique()} distinct config hashes in {t['variant'].nunique()} settings "
           f"(a setting = a config less its seed, density and sanity check)",
           f"- dates: {_when(t['started_at'].min())} to {_when(t['ended_at'].max())}",
           "- code: " + ", ".join(f"`{v}` ({n} trials)" for v, n in versions.most_common()),
           "- machines: " + ", ".join(f"{h} ({n} trials)" for h, n in Counter(t["hostname"].fillna("?")).most_common())
           + f"; {count(t['node_id'].nunique(), 'Ray node')}",
           "- libraries: " + ", ".join(sorted(k for k in libs)),
           "- data / model: " + ", ".join(sorted({f"{d} / {m}" for d, m in zip(t["dataset"], t["model"])})),
           f"- metric: `{res.metric}`, a fraction (0 to 1) in the tables and MLflow, in % here (differences in "
           f"points); report written {_when(datetime.datetime.now().timestamp())} "
           f"on {platform.node()}"]
    settings = t.drop_duplicates("variant")[["label", "variant"]]
    out += ["", "Settings (config hash less seed, density and sanity check):", "",
            "| setting | id | config hashes |", "|---|---|---|"]
    for label, variant in settings.itertuples(index=False):
        hashes = sorted(t[t["variant"] == variant]["config_hash"])
        out.append(f"| {label} | `{variant}` | {len(hashes)}: " + ", ".join(f"`{h}`" for h in hashes[:6])
                   + (" …" if len(hashes) > 6 else "") + " |")
    return "\n".join(out)


def build(paths, out=None, *, metric: str = "test_accuracy", allow_incomplete: bool = False,
          where: dict | None = None) -> Path:
    """Write ``out/report.md`` and its PNGs; returns the Markdown path."""
    res = load(paths, metric=metric, allow_incomplete=allow_incomplete, where=where)
    out = Path(out) if out is not None else Path(res.sweeps[0][0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    names = ", ".join(Path(f).name for f, _ in res.sweeps)
    md = [f"# cts-ray report: {names}", "", "## Provenance", "", provenance(res)]
    for kind in KINDS:
        try:
            text, files = run_kind(kind, res, out)
        except AnalysisError as e:
            if kind != "interaction":   # interaction: only where two swept axes form a grid, no section otherwise
                md += ["", f"## {TITLES[kind]}", "", f"_Not answerable from these trials: {e}_"]
            continue
        md += ["", f"## {TITLES[kind]}", "", text, ""]
        md += [f"![{Path(f).stem.replace('_', ' ')}]({Path(f).name})" for f in files]
    try:
        md += ["", "## Strong tickets", "", strong.markdown(strong.analyse(res))]
    except AnalysisError:
        pass   # no strong-ticket trials: no section
    try:
        md += ["", "## Inference cost", "", inference.markdown(inference.analyse(res))]
    except AnalysisError:
        pass   # no compact costs recorded: no section
    path = out / "report.md"
    storage.write_text(path, "\n".join(md) + "\n")
    return path
