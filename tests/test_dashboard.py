"""Static checks of the Grafana dashboard, the metrics docs and .env.example against the code.

The metric names, types and labels are an interface (SPEC §10): the
dashboard (``dashboards/mana-llm.json``), the README's metric table, the
queries and alert rules of ``dashboards/README.md`` and any metric any doc
names may only use what ``app/metrics.py`` defines, and ``app/metrics.py``
must still define what SPEC §10 promises. ``.env.example`` must list every
variable ``app/config.py`` and ``gunicorn.conf.py`` read, at its default.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from prometheus_client.metrics import MetricWrapperBase  # noqa: E402

from app import config as app_config  # noqa: E402
from app import metrics as app_metrics  # noqa: E402

DASHBOARD_PATH = os.path.join(REPO, "dashboards", "mana-llm.json")
README_PATH = os.path.join(REPO, "README.md")
DASHBOARDS_README_PATH = os.path.join(REPO, "dashboards", "README.md")
ENV_EXAMPLE_PATH = os.path.join(REPO, ".env.example")
GUNICORN_CONF_PATH = os.path.join(REPO, "gunicorn.conf.py")
# Every document a reader may take a metric name from.
DOC_PATHS = (README_PATH, DASHBOARDS_README_PATH, ENV_EXAMPLE_PATH,
             os.path.join(REPO, "bench", "README.md"))

# SPEC §10, copied by hand: exposed name -> (type, labels). A rename in
# app/metrics.py (or in the spec) must be made here too, deliberately.
SPEC_METRICS = {
    "mana_llm_requests_total": ("counter", ("method", "endpoint", "status")),
    "mana_llm_request_latency_seconds": ("histogram", ("method", "endpoint")),
    "mana_llm_llm_requests_total": ("counter", ("provider", "model", "streaming")),
    "mana_llm_tokens_total": ("counter", ("provider", "model", "type")),
    "mana_llm_llm_latency_seconds": ("histogram", ("provider", "model")),
    "mana_llm_llm_errors_total": ("counter", ("provider", "model", "error_type")),
    "mana_llm_alias_resolved_total": ("counter", ("alias", "target")),
    "mana_llm_fallback_total": ("counter", ("from_model", "to_model", "reason")),
    "mana_llm_provider_healthy": ("gauge", ("provider",)),
}
# The shared board's gauges (SPEC §13); the README table and dashboard panel come with it.
BOARD_METRICS = {"mana_llm_shared_state_up": ("gauge", ())}
# Callers, quotas and cost (SPEC §14): in the README table and the "Callers" row.
CALLER_METRICS = {
    "mana_llm_caller_requests_total": ("counter", ("caller", "status")),
    "mana_llm_caller_tokens_total": ("counter", ("caller", "provider", "type")),
    "mana_llm_cost_usd_total": ("counter", ("caller", "provider")),
    "mana_llm_quota_rejections_total": ("counter", ("caller", "limit")),
}
# The response cache: in the README table and the "Cache" row.
CACHE_METRICS = {
    "mana_llm_cache_requests_total": ("counter", ("result",)),
    "mana_llm_cache_bytes": ("gauge", ("store",)),
    "mana_llm_cache_saved_tokens_total": ("counter", ("provider", "type")),
    "mana_llm_cache_saved_usd_total": ("counter", ("provider",)),
}
# Capacity caps (SPEC §13): in the README table, with a panel of its own.
CAPACITY_METRICS = {"mana_llm_provider_inflight": ("gauge", ("provider",))}

METRIC_RE = re.compile(r"mana_llm_[a-z_]+")
STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GROUPING_RE = re.compile(r"\b(by|without)\s*\(([^()]*)\)")
MATCHING_RE = re.compile(r"\b(on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
SELECTOR_RE = re.compile(r"(mana_llm_[a-z_]+)\s*\{([^{}]*)\}")
MATCHER_LABEL_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
PROMQL_BLOCK_RE = re.compile(r"```promql\n(.*?)```", re.S)
YAML_BLOCK_RE = re.compile(r"```yaml\n(.*?)```", re.S)


# --------------------------------------------------------------- metric tables

def defined_metrics():
    """``{exposed name: (type, labels)}`` of the metric objects in app.metrics."""
    found = {}
    for obj in vars(app_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            # prometheus_client strips ``_total`` from a counter's _name and
            # adds it back on exposition.
            name = obj._name + ("_total" if obj._type == "counter" else "")
            found[name] = (obj._type, tuple(obj._labelnames))
    return found


def series_labels(metrics):
    """``{series name a query may select: allowed labels}`` for a metric table."""
    series = {}
    for name, (kind, labels) in metrics.items():
        if kind == "histogram":
            series[name + "_bucket"] = set(labels) | {"le"}
            series[name + "_sum"] = set(labels)
            series[name + "_count"] = set(labels)
        else:
            series[name] = set(labels)
    return series


def base_metric(series_name, metrics):
    """The SPEC §10 metric a series belongs to, or None."""
    for name, (kind, _) in metrics.items():
        if series_name == name:
            return name
        if kind == "histogram" and series_name in (name + "_bucket", name + "_sum",
                                                   name + "_count"):
            return name
    return None


ALLOWED = series_labels(defined_metrics())


# --------------------------------------------------------------- PromQL checks

def strip_strings(expr):
    """Blank out string literals, so matcher values cannot look like names or clauses."""
    return STRING_RE.sub('""', expr)


def group_after(text, pos):
    """The balanced ``( ... )`` starting at the first non-space at or after ``pos``."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text) or text[pos] != "(":
        return None
    depth = 0
    for end in range(pos, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            return text[pos:end + 1]
    return None


def group_before(text, pos):
    """The balanced ``( ... )`` ending at the last non-space before ``pos`` (postfix ``by``)."""
    pos -= 1
    while pos >= 0 and text[pos].isspace():
        pos -= 1
    if pos < 0 or text[pos] != ")":
        return None
    depth = 0
    for start in range(pos, -1, -1):
        depth += {")": 1, "(": -1}.get(text[start], 0)
        if depth == 0:
            return text[start:pos + 1]
    return None


def split_labels(text):
    return [label.strip() for label in text.split(",") if label.strip()]


def expr_problems(expr, allowed=None):
    """Return a list of what is wrong with ``expr`` against the metric table."""
    allowed = ALLOWED if allowed is None else allowed
    code = strip_strings(expr)
    problems = []
    names = METRIC_RE.findall(code)
    for name in names:
        if name not in allowed:
            problems.append(f"unknown metric series {name!r}")
    for name, matchers in SELECTOR_RE.findall(code):
        for label in MATCHER_LABEL_RE.findall(matchers):
            if name in allowed and label not in allowed[name]:
                problems.append(f"{name} has no label {label!r} (selector)")
    for match in GROUPING_RE.finditer(code):
        labels = split_labels(match.group(2))
        scope = group_after(code, match.end()) or group_before(code, match.start())
        scope_names = [n for n in METRIC_RE.findall(scope or "") if n in allowed]
        if not scope_names:
            problems.append(f"{match.group(0)!r} does not aggregate a known metric")
            continue
        for name in scope_names:
            for label in labels:
                if label not in allowed[name]:
                    problems.append(f"{name} has no label {label!r} ({match.group(1)})")
    known = [n for n in names if n in allowed]
    union = set().union(*(allowed[n] for n in known)) if known else set()
    for match in MATCHING_RE.finditer(code):
        for label in split_labels(match.group(2)):
            if label not in union:
                problems.append(f"no metric of the expression has label {label!r} "
                                f"({match.group(1)})")
    if "histogram_quantile" in code:
        for name in known:
            if not name.endswith("_bucket"):
                problems.append(f"histogram_quantile over non-bucket series {name!r}")
        for match in GROUPING_RE.finditer(code):
            if match.group(1) == "by" and "le" not in split_labels(match.group(2)):
                problems.append(f"histogram_quantile aggregation {match.group(0)!r} drops le")
    return problems


# --------------------------------------------------------------- the dashboard

@pytest.fixture(scope="module")
def dashboard():
    with open(DASHBOARD_PATH, encoding="utf-8") as handle:
        return json.load(handle)


def all_panels(dashboard):
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def graph_panels(dashboard):
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def panel_exprs(dashboard):
    """``[(panel title, expr)]`` of every target of every panel."""
    return [(panel.get("title"), target["expr"])
            for panel in graph_panels(dashboard)
            for target in panel.get("targets", []) if target.get("expr")]


def variable_query(variable):
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else (query or "")


def test_metrics_module_matches_spec_table():
    assert defined_metrics() == {**SPEC_METRICS, **BOARD_METRICS, **CALLER_METRICS,
                                 **CACHE_METRICS, **CAPACITY_METRICS}


def test_provider_health_gauge_is_livemin():
    # The docs and the health panels rely on it: a dead worker's value drops
    # out, and one live worker with a tripped breaker makes the host read 0.
    assert app_metrics.PROVIDER_HEALTHY._multiprocess_mode == "livemin"


def test_dashboard_is_importable(dashboard):
    assert dashboard["schemaVersion"] == 39
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard.get("id") is None
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    assert source["current"]["value"] == "${DS_PROMETHEUS}"
    for panel in graph_panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"


def test_provider_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    provider = variables["provider"]
    assert provider["type"] == "query"
    assert provider["datasource"]["uid"] == "${datasource}"
    query = variable_query(provider)
    assert re.fullmatch(r"label_values\(\s*mana_llm_llm_requests_total\s*,\s*provider\s*\)",
                        query), query
    assert "provider" in ALLOWED["mana_llm_llm_requests_total"]
    assert provider["includeAll"] and provider["allValue"] == ".*"
    users = [title for title, expr in panel_exprs(dashboard) if "$provider" in expr]
    assert users, "no panel filters by $provider"


def test_every_panel_has_title_description_and_expr(dashboard):
    for panel in all_panels(dashboard):
        assert panel.get("title", "").strip(), panel
        if panel["type"] == "row":
            assert not panel.get("targets")
            continue
        assert panel.get("description", "").strip(), panel["title"]
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert any(exprs), f"{panel['title']}: no target with an expr"
        assert all(exprs), f"{panel['title']}: a target without an expr"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_panel_ids_and_layout(dashboard):
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_panel_exprs_use_only_spec_metrics_and_labels(dashboard):
    problems = [f"{title}: {expr}: {problem}"
                for title, expr in panel_exprs(dashboard)
                for problem in expr_problems(expr)]
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_exprs_parse_with_promtool(dashboard, dashboards_md, tmp_path):
    """Every query is valid PromQL (with Grafana's variables as they expand for "All")."""
    exprs = [expr for _, expr in panel_exprs(dashboard)]
    exprs += PROMQL_BLOCK_RE.findall(dashboards_md)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"mana_llm_dashboard_check:{index}",
         "expr": expr.replace("$provider", ".*")} for index, expr in enumerate(exprs)]}]}
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_alert_rules_pass_promtool(dashboards_md, tmp_path):
    path = tmp_path / "alerts.yaml"
    path.write_text(alert_rules_text(dashboards_md))
    result = subprocess.run(["promtool", "check", "rules", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("table", [SPEC_METRICS, CALLER_METRICS, CACHE_METRICS],
                         ids=["spec", "callers", "cache"])
def test_every_spec_metric_is_on_the_dashboard(dashboard, table):
    used = set()
    for _, expr in panel_exprs(dashboard):
        for name in METRIC_RE.findall(strip_strings(expr)):
            used.add(base_metric(name, table))
    missing = set(table) - used
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_callers_row_is_on_the_dashboard(dashboard):
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert "Callers" in rows
    exprs = " ".join(expr for _, expr in panel_exprs(dashboard))
    assert "sum by (caller, provider) (rate(mana_llm_cost_usd_total" in exprs
    assert 'mana_llm_fallback_total{from_model=~"ollama/.*"' in exprs


def test_cache_row_is_on_the_dashboard(dashboard):
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert "Cache" in rows
    exprs = " ".join(expr for _, expr in panel_exprs(dashboard))
    assert 'mana_llm_cache_requests_total{result="hit"}' in exprs


def test_required_panels(dashboard):
    exprs = {re.sub(r"\s+", " ", expr) for _, expr in panel_exprs(dashboard)}
    for wanted in (
            "sum by (endpoint, status) (rate(mana_llm_requests_total[5m]))",
            'sum(rate(mana_llm_requests_total{status=~"503|429"}[5m]))',
            "sum by (reason) (rate(mana_llm_fallback_total[5m]))"):
        assert wanted in exprs, wanted
    quantiles = {(q, by) for expr in exprs for q, by in re.findall(
        r"histogram_quantile\((0\.\d+), sum by \(([^)]*)\)", expr)}
    for q in ("0.5", "0.95", "0.99"):
        assert (q, "le, endpoint") in quantiles
    for q in ("0.5", "0.95"):
        assert (q, "le, provider, model") in quantiles
    assert any("sum by (alias, target) (increase(mana_llm_alias_resolved_total[1h]))" in e
               for e in exprs)


def test_chain_exhausted_is_its_own_series(dashboard):
    exhausted = [t for p in graph_panels(dashboard) for t in p["targets"]
                 if re.search(r'mana_llm_fallback_total\{[^}]*to_model=""', t["expr"])]
    assert [t["legendFormat"] for t in exhausted] == ["chain exhausted"]
    hops = [t for p in graph_panels(dashboard) for t in p["targets"]
            if "by (from_model, to_model)" in t["expr"]]
    assert hops and all('to_model!=""' in t["expr"] for t in hops)


def test_provider_health_panels(dashboard):
    panels = [p for p in graph_panels(dashboard)
              if any("mana_llm_provider_healthy" in t["expr"] for t in p["targets"])]
    assert any(p["type"] in ("stat", "state-timeline") for p in panels)
    for panel in panels:
        for target in panel["targets"]:
            # min: one tripped worker or host must show as tripped.
            assert re.match(r"\s*min by \(provider\) \(mana_llm_provider_healthy\b",
                            target["expr"]), target["expr"]
        options = {}
        for mapping in panel["fieldConfig"]["defaults"]["mappings"]:
            if mapping["type"] == "value":
                options.update(mapping["options"])
        assert options["1"]["text"] == "healthy" and options["1"]["color"] == "green"
        assert options["0"]["text"] == "tripped" and options["0"]["color"] == "red"


# --------------------------------------------------------------- the checker itself

@pytest.mark.parametrize("expr, complaint", [
    ("sum(rate(mana_llm_request_total[5m]))", "unknown metric"),
    ("rate(mana_llm_llm_requests[5m])", "unknown metric"),
    ("histogram_quantile(0.9, sum by (le) (rate(mana_llm_llm_latency_seconds[5m])))",
     "unknown metric"),
    ("sum by (model) (rate(mana_llm_requests_total[5m]))", "no label 'model'"),
    ("sum(rate(mana_llm_tokens_total[5m])) by (kind)", "no label 'kind'"),
    ("sum by (le) (rate(mana_llm_llm_latency_seconds_sum[5m]))", "no label 'le'"),
    ('rate(mana_llm_fallback_total{from="x"}[5m])', "no label 'from'"),
    ("histogram_quantile(0.5, sum by (provider) "
     "(rate(mana_llm_llm_latency_seconds_bucket[5m])))", "drops le"),
    ("sum by (alias) (rate(mana_llm_alias_resolved_total[5m])) / on (model) "
     "sum by (alias) (rate(mana_llm_alias_resolved_total[5m]))", "label 'model'"),
])
def test_checker_rejects(expr, complaint):
    problems = expr_problems(expr)
    assert any(complaint in p for p in problems), problems


def test_checker_accepts_and_follows_the_app():
    expr = 'sum by (provider, model) (rate(mana_llm_tokens_total{type="prompt"}[5m]))'
    assert expr_problems(expr) == []
    # A renamed label in app/metrics.py would make the same query fail.
    renamed = series_labels({"mana_llm_tokens_total": ("counter", ("provider", "model",
                                                                   "kind"))})
    assert expr_problems(expr, renamed)


# ------------------------------------------- README and dashboards/README.md

def read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def section(text, heading):
    """Return ``heading``'s section of ``text``, up to the next heading of any level <= its own."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n") + 1
    ends = [text.find(f"\n{'#' * n} ", start + 1) for n in range(1, len(level) + 1)]
    ends = [end for end in ends if end != -1]
    return text[start:min(ends) if ends else None]


def table_rows(text):
    """Return the cells of every markdown table body row in ``text``."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"[|\-: ]+", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def readme():
    return read(README_PATH)


@pytest.fixture(scope="module")
def metrics_md(readme):
    """Return the README's "### Metrics" section (under "## Operating it")."""
    return section(readme, "### Metrics")


@pytest.fixture(scope="module")
def dashboards_md():
    return read(DASHBOARDS_README_PATH)


def alert_rules_text(dashboards_md):
    """Return the one YAML block of dashboards/README.md that is a rules file."""
    blocks = [b for b in YAML_BLOCK_RE.findall(dashboards_md) if b.lstrip().startswith("groups:")]
    assert len(blocks) == 1, "dashboards/README.md needs exactly one alert rules block"
    return blocks[0]


def test_metrics_md_table_matches_spec(metrics_md):
    assert metrics_md.lstrip().startswith("### Metrics")
    rows = {}
    for cells in table_rows(metrics_md):
        if cells[0].startswith("`mana_llm_"):
            labels = tuple(re.findall(r"[a-z_]+", cells[2].split("(")[0]))
            rows[cells[0].strip("`")] = (cells[1], labels)
    assert rows == {**SPEC_METRICS, **CALLER_METRICS, **CACHE_METRICS, **CAPACITY_METRICS}


def test_every_metric_of_the_readme_table_has_a_panel(metrics_md, dashboard):
    listed = {cells[0].strip("`") for cells in table_rows(metrics_md)
              if cells[0].startswith("`mana_llm_")}
    table = {name: kind for name, kind in defined_metrics().items() if name in listed}
    used = {base_metric(name, table) for _, expr in panel_exprs(dashboard)
            for name in METRIC_RE.findall(strip_strings(expr))}
    assert listed and not listed - used, f"without a panel: {sorted(listed - used)}"


@pytest.mark.parametrize("path", DOC_PATHS, ids=lambda path: os.path.relpath(path, REPO))
def test_every_metric_named_in_the_docs_exists(path):
    named = set(METRIC_RE.findall(read(path)))
    unknown = sorted(n for n in named if n not in ALLOWED and n not in defined_metrics())
    assert not unknown, f"{os.path.relpath(path, REPO)} names metrics the code lacks: {unknown}"


def test_dashboards_md_queries_are_valid(dashboards_md):
    queries = PROMQL_BLOCK_RE.findall(dashboards_md)
    assert len(queries) >= 6
    problems = [f"{q.strip()}: {p}" for q in queries for p in expr_problems(q)]
    assert not problems, "\n".join(problems)


def test_alert_rules_use_only_known_metrics_and_labels(dashboards_md):
    rules = [rule for group in yaml.safe_load(alert_rules_text(dashboards_md))["groups"]
             for rule in group["rules"]]
    assert rules and all(rule.get("alert") and rule.get("expr") for rule in rules)
    problems = [f"{rule['alert']}: {p}" for rule in rules for p in expr_problems(rule["expr"])]
    assert not problems, "\n".join(problems)


def test_the_label_cap_is_stated_where_the_metrics_are(metrics_md, dashboards_md):
    cap = app_config.build_config({})["METRICS_LABEL_CAP"]
    for text in (metrics_md, dashboards_md):
        assert f"METRICS_LABEL_CAP={cap}" in text.replace("`", "")
        assert "`other`" in text


def test_readme_points_at_the_dashboard_docs(metrics_md, dashboards_md):
    assert "dashboards/README.md" in metrics_md
    assert "mana-llm.json" in metrics_md and "mana-llm.json" in dashboards_md
    assert os.path.exists(DASHBOARD_PATH)


def test_readme_cites_no_hidden_documents(readme):
    # The README is for readers of this repository, who cannot see the spec or the tracker.
    assert not re.search(r"SPEC|§|\bissue \d", readme)


# --------------------------------------------------------------- .env.example

ENV_LINE_RE = re.compile(r"^#\s?([A-Z][A-Z0-9_]*)=(.*)$")
# Handed from gunicorn's master to its workers, or not ours: not settings.
INTERNAL_VARIABLES = {"PYTHONPATH"}


def env_example():
    """Return ``[(name, value, described)]`` of the commented-out variables of .env.example."""
    found = []
    described = False  # a comment line opens the variable's block, a blank line closes it
    for line in read(ENV_EXAMPLE_PATH).splitlines():
        match = ENV_LINE_RE.match(line)
        if match:
            found.append((match.group(1), match.group(2).strip(), described))
        else:
            described = line.startswith("# ") and not line.startswith("# ---")
    return found


def gunicorn_variables():
    """Return ``{name: default or None}`` of the variables gunicorn.conf.py reads."""
    source = read(GUNICORN_CONF_PATH)
    found = {}
    for name, default in re.findall(r"_env_int\(\s*[\"']([A-Z0-9_]+)[\"']\s*,\s*(\d+)", source):
        found[name] = default
    for name, default in re.findall(
            r"os\.environ\.get\(\s*[\"']([A-Z0-9_]+)[\"']\s*(?:,\s*[\"']([^\"']*)[\"'])?",
            source):
        found.setdefault(name, default or None)
    return {name: default for name, default in found.items()
            if name not in INTERNAL_VARIABLES and not name.startswith("MANA_LLM_")}


def test_env_example_lists_every_variable_the_code_reads():
    listed = [name for name, _, _ in env_example()]
    assert len(listed) == len(set(listed)), "a variable is listed twice"
    known = set(app_config.build_config({})) | set(gunicorn_variables())
    missing = sorted(known - set(listed))
    unknown = sorted(set(listed) - known)
    assert not missing, f".env.example lacks {missing}"
    assert not unknown, f".env.example lists variables no code reads: {unknown}"


def test_env_example_describes_every_variable():
    undescribed = [name for name, _, described in env_example() if not described]
    assert not undescribed, f"no comment line above {undescribed}"


def test_env_example_values_are_the_defaults(tmp_path):
    """Uncommented, .env.example must give exactly the default configuration."""
    config_names = set(app_config.build_config({}))
    dotenv = tmp_path / ".env"
    dotenv.write_text("".join(f"{name}={value}\n" for name, value, _ in env_example()
                              if name in config_names))
    loaded = app_config.from_env(environ={}, dotenv_path=str(dotenv))
    for name in ("ALIASES_PATH", "PRICES_PATH"):  # relative to the working directory
        loaded[name] = os.path.join(REPO, loaded[name])
    assert loaded == app_config.build_config({})
    for name, default in gunicorn_variables().items():
        value = dict((n, v) for n, v, _ in env_example())[name]
        if name not in config_names:
            assert value == (default or ""), name


def test_readme_configuration_table_names_real_variables(readme):
    listed = {name for name, _, _ in env_example()}
    table = section(readme, "## Configuration")
    names = set()
    for cells in table_rows(table)[1:]:
        names.update(n for n in re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]))
    assert names and names <= listed, sorted(names - listed)
    assert ".env.example" in table
