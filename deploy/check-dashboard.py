#!/usr/bin/env python3
"""Structural check of the Grafana dashboard, since Grafana itself is not installed where CI runs.

    deploy/check-dashboard.py --metrics SCRAPE [DASHBOARD]

SCRAPE is the text of a /metrics scrape of a freshly started daemon; DASHBOARD defaults to
deploy/grafana/posgate.json. The dashboard must load under Grafana's file provisioning, which
resolves no import-time inputs, and must only query metrics the daemon exports. It fails when:

- it has `__inputs` or any `${DS_...}` placeholder (both work only through Dashboards -> Import);
- there is no template variable of type `datasource` with query `prometheus`, or a panel, target,
  query variable or Prometheus annotation does not use that variable as its datasource;
- a panel query selects a metric without `job="$job"` and `instance=~"$instance"`;
- a query names a `posgate_*` metric the scrape does not have (a histogram is looked up by its
  family name, `_bucket`, `_sum` and `_count` stripped), or queries a histogram by its bare name.

Every problem is printed, one a line, then it exits 1; 0 when there is none, 2 on bad usage.
Python 3 standard library only.
"""

import argparse
import json
import re
import sys

METRIC = re.compile(r"\b(posgate_[a-z0-9_]+)")
# A selector of a metric in a panel query: the name and its label matchers, if any.
SELECTOR = re.compile(r"\b(posgate_[a-z0-9_]+|up)\b(\{[^}]*\})?")
PLACEHOLDER = re.compile(r"\$\{?DS_[A-Za-z0-9_]*\}?")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PANEL_MATCHERS = ('job="$job"', 'instance=~"$instance"')


def parse_scrape(text):
    """Returns (families with at least one sample, {family: type}) of a Prometheus text scrape."""
    types = {}
    samples = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    families = set()
    for name in samples:
        family = name
        for suffix in HISTOGRAM_SUFFIXES:
            base = name[: -len(suffix)]
            if name.endswith(suffix) and types.get(base) in ("histogram", "summary"):
                family = base
        families.add(family)
    return families, types


def family_of(name):
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def walk_panels(panels, path=""):
    """Yields (where, panel) for every panel, including those inside collapsed rows."""
    for panel in panels:
        where = f"{path}panel {panel.get('id')} {panel.get('title', '')!r}"
        yield where, panel
        yield from walk_panels(panel.get("panels", []), where + " > ")


def query_text(query):
    """The PromQL of a variable's query, which Grafana stores as a string or as {"query": ...}."""
    if isinstance(query, dict):
        return query.get("query", "")
    return query if isinstance(query, str) else ""


def check(dashboard, raw, families, types):
    problems = []

    if "__inputs" in dashboard:
        problems.append("has __inputs: import-time inputs are not resolved by file provisioning")
    for placeholder in sorted(set(PLACEHOLDER.findall(raw))):
        problems.append(f"has the placeholder {placeholder}: use the datasource template variable")

    variables = dashboard.get("templating", {}).get("list", [])
    ds_names = [
        v.get("name")
        for v in variables
        if v.get("type") == "datasource" and v.get("query") == "prometheus"
    ]
    if not ds_names:
        problems.append("no template variable of type datasource with query prometheus")
        return problems
    ds_uids = {f"${{{name}}}" for name in ds_names} | {f"${name}" for name in ds_names}

    def uses_ds(where, obj):
        ds = obj.get("datasource")
        uid = ds.get("uid") if isinstance(ds, dict) else ds
        if uid not in ds_uids:
            problems.append(f"{where}: datasource is {ds!r}, not the variable ${{{ds_names[0]}}}")

    queries = []  # (where, PromQL, is a panel query)
    for v in variables:
        if v.get("type") == "query":
            where = f"variable {v.get('name')!r}"
            uses_ds(where, v)
            queries.append((where, query_text(v.get("query")) or v.get("definition", ""), False))
    for a in dashboard.get("annotations", {}).get("list", []):
        if a.get("builtIn"):
            continue
        where = f"annotation {a.get('name')!r}"
        uses_ds(where, a)
        target = a.get("target") if isinstance(a.get("target"), dict) else {}
        queries.append((where, a.get("expr") or target.get("expr", ""), False))
    for where, panel in walk_panels(dashboard.get("panels", [])):
        if panel.get("type") == "row":
            continue
        uses_ds(where, panel)
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{where}: no targets")
        for target in targets:
            twhere = f"{where} target {target.get('refId')}"
            uses_ds(twhere, target)
            queries.append((twhere, target.get("expr", ""), True))

    missing = {}  # family -> where it is used
    for where, expr, is_panel in queries:
        if not expr:
            problems.append(f"{where}: empty query")
        for name in METRIC.findall(expr):
            family = family_of(name)
            if family not in families:
                missing.setdefault(family, where)
            elif name == family and types.get(family) == "histogram":
                problems.append(
                    f"{where}: {name} is a histogram: query {name}_bucket, _sum or _count"
                )
        if is_panel:
            for name, matchers in SELECTOR.findall(expr):
                if not all(m in matchers for m in PANEL_MATCHERS):
                    problems.append(
                        f"{where}: {name}{matchers} lacks {', '.join(PANEL_MATCHERS)}"
                    )
    for family, where in sorted(missing.items()):
        problems.append(f"metric {family} (used in {where}) is not in the scrape")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--metrics", required=True, metavar="FILE", help="a /metrics scrape of a fresh daemon"
    )
    parser.add_argument("dashboard", nargs="?", default="deploy/grafana/posgate.json")
    args = parser.parse_args()

    with open(args.dashboard, encoding="utf-8") as f:
        raw = f.read()
    try:
        dashboard = json.loads(raw)
    except json.JSONDecodeError as e:
        print(f"{args.dashboard}: not JSON: {e}")
        return 1
    with open(args.metrics, encoding="utf-8") as f:
        families, types = parse_scrape(f.read())
    if not any(name.startswith("posgate_") for name in families):
        print(f"{args.metrics}: no posgate_* metric at all: not a scrape of posgate's /metrics")
        return 1

    problems = check(dashboard, raw, families, types)
    for problem in problems:
        print(f"{args.dashboard}: {problem}")
    if problems:
        missing = sorted({p.split()[1] for p in problems if p.startswith("metric ")})
        if missing:
            print(f"metrics missing from the scrape ({len(missing)}): {' '.join(missing)}")
        return 1
    print(
        f"{args.dashboard}: ok (the datasource variable everywhere, "
        f"every queried metric among the {len(families)} families in the scrape)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
